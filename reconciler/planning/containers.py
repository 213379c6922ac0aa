"""Containers as the planner wants them: from `Container` specs, and from `Model` specs via engine presets.

A Model becomes the container its engine needs, with every argument written
out so the plan shows exactly what will run:

- vLLM: the OpenAI-compatible server; --tensor-parallel-size equals the
  number of GPUs, and tensor parallel gets host IPC (NCCL needs shared memory).
- llama.cpp `llama-server`: -m, -c always set, -ngl, --host, --port, flash
  attention, --parallel, and automatic fitting off (it would silently shrink
  the context to fit).
- Ollama: its OLLAMA_* environment; the model to load is recorded in a label
  and loaded by the engine after start.

GPUs are handed over by NVML UUID with CUDA_DEVICE_ORDER=PCI_BUS_ID, never by
index: CUDA and nvidia-smi number mixed cards differently. Model files are
mounted read-only. Secret values never appear here: `secret_env` keeps the
name of the variable that holds each one, resolved only when applying. The
container carries the names of its secret keys in a label, so a later plan
knows, from the container alone, which live values it must never show.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, assert_never

from reconciler.planning.container_run import ContainerHealthcheck, ContainerProbe, ContainerRun
from reconciler.planning.observed import ContainerPort, ContainerVolume
from reconciler.spec.models import Container, Engine, Lab, Model, Workload

__all__ = [
    "MANAGED_LABEL",
    "desired_container",
    "label_keys",
]

MANAGED_LABEL = "managed"
DEFAULT_LLAMACPP_CONTEXT = 8192
GIB = 1024**3


def label_keys(owner: str) -> dict[str, str]:
    """Label names under the owner's prefix ("reconciler.managed", ...)."""
    return {
        "managed": f"{owner}.managed",
        "resource": f"{owner}.resource",
        "host": f"{owner}.host",
        "spec_hash": f"{owner}.spec-hash",
        "env_keys": f"{owner}.env-keys",
        "secret_env_keys": f"{owner}.secret-env-keys",  # which env keys hold secrets: the planner never shows them
        "revision": f"{owner}.revision",
        "load": f"{owner}.load",
    }


def desired_container(
    workload: Workload,
    *,
    lab: Lab,
    gpu_names: tuple[str, ...],
    gpu_uuids: Mapping[str, str],
    revision: str | None,
) -> ContainerRun:
    """The container for a Container or Model spec. GPUs missing from `gpu_uuids` are left unresolved."""
    if isinstance(workload, Model):
        run = _preset(workload, lab=lab, gpu_count=len(gpu_names))
    elif isinstance(workload, Container):
        run = _plain(workload)
    else:  # pragma: no cover - Workload has two kinds
        raise TypeError(type(workload).__name__)
    uuids = tuple(gpu_uuids[name] for name in gpu_names if name in gpu_uuids)
    unresolved = tuple(name for name in gpu_names if name not in gpu_uuids)
    env = dict(run.pop("env"))
    if gpu_names:
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env.update(workload.env)
    keys = label_keys(lab.owner)
    labels = _labels(workload, keys, run.pop("labels", {}), env)
    health, probe = run.pop("healthcheck"), _probe(workload, run.pop("probe", None), run["ports"])
    container = ContainerRun(
        host=workload.host,
        name=workload.name,
        resource=workload.ref,
        env=env,
        secret_env=dict(workload.secret_env),
        labels=labels,
        volumes=tuple(
            ContainerVolume(host=host, path=path, readonly=readonly)
            for host, path, readonly in sorted(
                {
                    (_clean(host), _clean(path), readonly)
                    for host, path, readonly in (
                        *run.pop("volumes"),
                        *((v.host, v.path, v.readonly) for v in workload.volumes),
                    )
                }
            )
        ),
        gpus=uuids,
        gpu_names=gpu_names,
        restart=str(workload.restart),
        state=workload.state,
        ports=tuple(ContainerPort(bind=b, host=h, container=c, protocol=p) for b, h, c, p in run.pop("ports")),
        healthcheck=ContainerHealthcheck(**health) if health else None,
        probe=ContainerProbe(**probe) if probe else None,
        unresolved_gpus=unresolved,
        **run,
    )
    stamps = {keys["spec_hash"]: container.spec_hash()}
    if revision:
        stamps[keys["revision"]] = revision
    return replace(container, labels={**labels, **stamps})


def _labels(
    workload: Workload, keys: Mapping[str, str], preset: Mapping[str, str], env: Mapping[str, str]
) -> dict[str, str]:
    """The spec's labels, the preset's, and the ownership marks (which env keys were set, which are secret)."""
    labels = {**workload.labels, **preset}
    labels[keys["managed"]] = "true"
    labels[keys["resource"]] = workload.ref
    labels[keys["host"]] = workload.host
    labels[keys["env_keys"]] = ",".join(sorted({*env, *workload.secret_env}))
    labels[keys["secret_env_keys"]] = ",".join(sorted(workload.secret_env))
    return labels


def _plain(spec: Container) -> dict[str, Any]:
    health = spec.healthcheck
    return {
        "image": spec.image,
        "command": spec.command,
        "entrypoint": spec.entrypoint,
        "env": {},
        "ports": tuple((p.bind, p.host, p.container, p.protocol) for p in spec.ports),
        "volumes": (),
        "devices": spec.devices,
        "shm_size": spec.shm_size,
        "ipc": spec.ipc,
        "network_mode": spec.network_mode,
        "healthcheck": health.model_dump(mode="python") if health else None,
    }


def _preset(model: Model, *, lab: Lab, gpu_count: int) -> dict[str, Any]:
    image = model.image or getattr(lab.images, model.engine.value)
    served = model.served_name or model.name
    volume_root = model.models_dir or (
        posixpath.dirname(model.source) if model.engine is Engine.LLAMACPP else model.source
    )
    volumes: tuple[tuple[str, str, bool], ...] = ()
    if model.engine is not Engine.OLLAMA:
        volumes = ((volume_root, volume_root, True),)
    common: dict[str, Any] = {
        "image": image,
        "entrypoint": None,
        "ports": ((model.bind, model.port, model.port, "tcp"),),
        "volumes": volumes,
        "devices": (),
        "shm_size": None,
        "ipc": None,
        "network_mode": None,
        "healthcheck": None,
    }
    match model.engine:
        case Engine.VLLM:
            return {**common, **_vllm(model, served, gpu_count)}
        case Engine.LLAMACPP:
            return {**common, **_llamacpp(model, served, gpu_count)}
        case Engine.OLLAMA:
            return {**common, **_ollama(model, lab)}
        case _:
            assert_never(model.engine)


def _vllm(model: Model, served: str, gpu_count: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": model.source,
        "served-model-name": served,
        "host": "0.0.0.0",
        "port": model.port,
        "tensor-parallel-size": max(gpu_count, 1),
    }
    if model.context is not None:
        args["max-model-len"] = model.context
    if model.quantization is not None:
        args["quantization"] = model.quantization
    args.update(_dashed(model.args))
    return {
        "command": _flags(args),
        "env": {"VLLM_NO_USAGE_STATS": "1"},
        "ipc": "host" if gpu_count > 1 else None,
        "shm_size": None if gpu_count > 1 else 2 * GIB,
        "probe": _http_probe(model, "/health"),
    }


def _llamacpp(model: Model, served: str, gpu_count: int) -> dict[str, Any]:
    args = {
        "model": model.source,
        "alias": served,
        "ctx-size": model.context or DEFAULT_LLAMACPP_CONTEXT,
        "n-gpu-layers": 999 if gpu_count else 0,
        "host": "0.0.0.0",
        "port": model.port,
        "flash-attn": "on",
        "parallel": 1,
        "fit": "off",
    }
    args.update(_dashed(model.args))
    return {"command": _flags(args), "env": {}, "probe": _http_probe(model, "/health")}


def _ollama(model: Model, lab: Lab) -> dict[str, Any]:
    env = {
        "OLLAMA_HOST": f"0.0.0.0:{model.port}",
        "OLLAMA_KEEP_ALIVE": "-1",
        "OLLAMA_MAX_LOADED_MODELS": "1",
        "OLLAMA_FLASH_ATTENTION": "1",
    }
    for key, value in model.args.items():
        env[f"OLLAMA_{key.upper()}"] = _text(value)
    if model.context is not None:
        env["OLLAMA_CONTEXT_LENGTH"] = str(model.context)
    return {
        "volumes": ((model.models_dir, "/root/.ollama", False),) if model.models_dir else (),
        "command": None,
        "env": env,
        "labels": {label_keys(lab.owner)["load"]: model.source},
        "load": model.source,
        "probe": _http_probe(model, "/api/tags"),
    }


def _http_probe(model: Model, path: str) -> dict[str, Any]:
    # Large models take minutes to load: the default waits up to 15 minutes.
    return {"http": path, "tcp": None, "status": 200, "body": None, "timeout": 900.0, "interval": 5.0}


def _probe(
    workload: Workload, preset: dict[str, Any] | None, ports: tuple[tuple[str, int, int, str], ...]
) -> dict[str, Any] | None:
    """The declared probe, else the engine's; a path-only HTTP probe gets the port it is joined to."""
    probe = workload.probe.model_dump(mode="python") if workload.probe else preset
    if probe is None:
        return None
    port = workload.port if isinstance(workload, Model) else next((p[1] for p in ports), None)
    return {**probe, "port": port}


def _clean(path: str) -> str:
    """A bind mount path as Docker keeps it (Go's filepath.Clean): `/srv/x/` and `/srv//x` are `/srv/x`."""
    cleaned = posixpath.normpath(path)
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def _dashed(args: Mapping[str, Any]) -> dict[str, Any]:
    return {key.replace("_", "-"): value for key, value in args.items()}


def _flags(args: Mapping[str, Any]) -> tuple[str, ...]:
    """`{"max-model-len": 16384, "enable-prefix-caching": True}` -> ("--max-model-len", "16384", ...).

    True is a bare flag; False leaves the flag out (the engine default).
    """
    out: list[str] = []
    for key, value in args.items():
        if value is False:
            continue
        out.append(f"--{key}")
        if value is not True:
            out.append(_text(value))
    return tuple(out)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
