"""Reading a host's GPUs through its Docker engine (DockerBackend.query_gpus), against a real engine.

The private dockerd of the test session carries the fake NVIDIA toolkit hook,
so the probe's GPU device request is accepted as on a GPU host. Nothing here
has a GPU: the images hold a stand-in `nvidia-smi`, a shell script printing
what a real one prints for the query the backend sends (it checks the query,
so a changed query fails the test), as the toolkit would inject the real one.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from typing import Any

import pytest

from reconciler.backends.docker import DockerBackend, DockerHostSettings
from reconciler.errors import ConfigError, NotFoundError
from reconciler.planning.gpusight import COMPUTE_APPS_QUERY, GPU_QUERY
from reconciler.planning.observed import GpuProcess
from tests.support.components import missing
from tests.support.dockerd import BUSYBOX, DockerEngine

pytestmark = pytest.mark.docker

MIB = 1024**2
GPUS = (
    "0, GPU-11111111-2222-3333-4444-555555555555, 00000000:01:00.0, NVIDIA GeForce RTX 3090, 24576, 18300, 5936, "
    "87, 64, 291.42, 350.00, 580.105.08\n"
    "1, GPU-66666666-7777-8888-9999-000000000000, 00000000:02:00.0, NVIDIA GeForce RTX 3090, 24576, 3, 24183, "
    "[N/A], 31, [N/A], 350.00, 580.105.08\n"
)
APPS = "GPU-11111111-2222-3333-4444-555555555555, 4242, 17800\n"

# The stand-in: answers exactly the two queries the backend makes, from files baked into the image, and only
# when the container asked the toolkit for every GPU with the utility capability (what makes it inject nvidia-smi).
NVIDIA_SMI = f"""#!/bin/sh
[ "$NVIDIA_VISIBLE_DEVICES" = all ] || {{ echo "no GPUs requested" >&2; exit 3; }}
case ",$NVIDIA_DRIVER_CAPABILITIES," in *,utility,*) ;; *) echo "no utility capability" >&2; exit 3 ;; esac
case "$*" in
  "--query-gpu={GPU_QUERY} --format=csv,noheader,nounits") cat /fake-smi/gpus; exit $(cat /fake-smi/status) ;;
  "--query-compute-apps={COMPUTE_APPS_QUERY} --format=csv,noheader,nounits") cat /fake-smi/apps ;;
  *) echo "unexpected arguments: $*" >&2; exit 2 ;;
esac
"""


def _file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def _image(client: Any, tag: str, *, gpus: str, apps: str = "", status: int = 0, smi: bool = True) -> str:
    """A busybox image with (or without) the stand-in nvidia-smi, imported without a registry."""
    if not BUSYBOX.is_file():
        missing("busybox", f"{BUSYBOX} is missing (apt-get install busybox-static)")
    applets = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _file(tar, "bin/busybox", BUSYBOX.read_bytes(), 0o755)
        for applet in applets:
            if "/" not in applet and applet != "busybox":
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(info)
        if smi:
            _file(tar, "usr/bin/nvidia-smi", NVIDIA_SMI.encode(), 0o755)
        _file(tar, "fake-smi/gpus", gpus.encode())
        _file(tar, "fake-smi/apps", apps.encode())
        _file(tar, "fake-smi/status", f"{status}\n".encode())
    repository, _, version = tag.rpartition(":")
    changes = ["ENV PATH=/usr/bin:/bin"]
    client.api.import_image_from_data(buffer.getvalue(), repository=repository, tag=version, changes=changes)
    return tag


@pytest.fixture
def backend(docker_engine: DockerEngine) -> Any:
    with DockerBackend({"infer": DockerHostSettings("infer", docker_engine.endpoint)}, owner_label="lab") as made:
        yield made


def _probes(client: Any) -> list[Any]:
    return client.containers.list(all=True, filters={"label": "lab.probe"})


def test_gpus_are_read_through_the_engine(backend: DockerBackend, docker_client: Any) -> None:
    image = _image(docker_client, "reconciler-test/smi:two-3090", gpus=GPUS, apps=APPS)

    observed = backend.query_gpus("infer", image=image)

    assert observed.available, observed.error
    assert observed.driver_version == "580.105.08"
    first, second = observed.gpus
    assert (first.uuid, first.pci_bus_id, first.memory_free, first.power_usage) == (
        "GPU-11111111-2222-3333-4444-555555555555",
        "0000:01:00.0",
        5936 * MIB,
        291.42,
    )
    assert first.processes == (GpuProcess(pid=4242, used_memory=17800 * MIB),)
    assert (second.utilization, second.power_usage, second.power_limit) == (None, None, 350.0)
    assert _probes(docker_client) == []  # the probe container is gone


def test_nvidia_smi_failing_is_reported_not_raised(backend: DockerBackend, docker_client: Any) -> None:
    failing = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
    image = _image(docker_client, "reconciler-test/smi:no-driver", gpus=failing, status=9)

    observed = backend.query_gpus("infer", image=image)

    assert not observed.available
    assert observed.error is not None
    assert "exited with 9" in observed.error
    assert "couldn't communicate with the NVIDIA driver" in observed.error
    assert _probes(docker_client) == []


def test_no_toolkit_means_no_nvidia_smi(backend: DockerBackend, docker_client: Any) -> None:
    image = _image(docker_client, "reconciler-test/smi:absent", gpus="", smi=False)

    observed = backend.query_gpus("infer", image=image)

    assert not observed.available
    assert observed.error is not None
    assert "NVIDIA container toolkit" in observed.error


def test_output_that_is_not_a_gpu_list_is_reported(backend: DockerBackend, docker_client: Any) -> None:
    image = _image(docker_client, "reconciler-test/smi:garbage", gpus="<html>proxy error</html>\n")

    observed = backend.query_gpus("infer", image=image)

    assert not observed.available
    assert observed.error is not None
    assert "not a GPU list" in observed.error
    assert _probes(docker_client) == []


def test_a_missing_image_is_not_found(backend: DockerBackend, docker_client: Any) -> None:
    with pytest.raises(NotFoundError) as raised:
        backend.query_gpus("infer", image="reconciler-test/no-such-image:1")
    assert raised.value.resource == "infer/gpus"
    assert _probes(docker_client) == []


def test_an_unknown_host_is_a_config_error(backend: DockerBackend) -> None:
    with pytest.raises(ConfigError, match="no Docker host named 'elsewhere'"):
        backend.query_gpus("elsewhere", image="x")
