/*
 * A fake libnvidia-ml.so.1: the part of the NVML C API that the reconciler's
 * NVML backend reaches through the real nvidia-ml-py bindings, answering from
 * a plain-text state file instead of a GPU.
 *
 * Tests and the demo build it with `cc` (reconciler.fakes.nvml.build_library)
 * and hand its path to NvmlBackend, so the real bindings, their ctypes
 * structures and their error handling are what the tests exercise. The state
 * file named by the environment variable FAKE_NVML_STATE is read again on
 * every call, so a test can fill VRAM, add a process or lose a GPU while the
 * library stays loaded.
 *
 * State file: one record a line, `KIND key=value ...`; `#` starts a comment
 * line. Values hold no spaces: `%XX` stands for any byte (so a GPU name is
 * written `NVIDIA%20GeForce%20GTX%20970`). Numbers may be decimal or 0x-hex.
 * A number written `na` (or left out, where no default is given) makes the
 * call that reports it return NVML_ERROR_NOT_SUPPORTED. Unknown kinds or keys
 * are errors: the call returns NVML_ERROR_UNKNOWN and a line goes to stderr.
 *
 *   system driver=580.105.08 nvml=13.580.105.08 root=1 fail=nvmlInit:9
 *   gpu index=0 uuid=GPU-... pci_bus_id=0000:01:00.0 name=NVIDIA%20... \
 *       memory_total=17179869184 memory_used=0 memory_reserved=0 \
 *       utilization=0 temperature=40 power_usage_mw=30000 \
 *       power_limit_mw=300000 power_min_mw=100000 power_max_mw=350000 \
 *       power_default_mw=300000 persistence=0 compute_mode=0 \
 *       lost=0 fail=nvmlDeviceGetPowerUsage:3
 *   process gpu=0 pid=4242 memory=1073741824 name=/usr/bin/python3
 *   process gpu=0 pid=5151 memory=8589934592 gone=1 release_after=2
 *   set gpu=0 power_limit_mw=250000 persistence=1 compute_mode=3
 *
 * system   driver (default 580.105.08), nvml (default 13.<driver>);
 *          root=0: every Set call answers NVML_ERROR_NO_PERMISSION, as for a
 *          user who is not root (default 1).
 * gpu      index defaults to the line's position among gpu lines; indexes
 *          must be 0..n-1. uuid, pci_bus_id and name are required.
 *          memory_used and memory_reserved default to 0; free is
 *          total - used - reserved (memory_v2); the v1 struct counts reserved
 *          memory as used, as the real library does.
 *          lost=1: every call for this GPU, handle lookups included, returns
 *          NVML_ERROR_GPU_IS_LOST.
 *          power_limit_mw is the enforced (and management) limit;
 *          power_min/max/default_mw answer the constraint and default calls
 *          (na: NOT_SUPPORTED, and setting a limit is NOT_SUPPORTED too).
 *          persistence (0/1) and compute_mode (0 default, 2 prohibited,
 *          3 exclusive process) default to 0.
 * process  a compute process on GPU `gpu`; memory=na reports
 *          NVML_VALUE_NOT_AVAILABLE. name answers nvmlSystemGetProcessName.
 *          gone=1: the process has exited and is not listed, but the driver
 *          frees its memory late: it still counts as used for the first
 *          `release_after` memory reads of that GPU (nvmlDeviceGetMemoryInfo
 *          and _v2) after the file was written, and is free from then on.
 *          A switch that waits for memory to be freed reads it several times.
 * set      what the Set calls (power limit, persistence, compute mode)
 *          appended to the file: applied to GPU `gpu` over its gpu line, the
 *          later line winning (at most 1024 of them). Writing the file
 *          anew forgets them.
 * fail     comma-separated `function:code` pairs: that exported function
 *          returns that code for this GPU (gpu line) or for the system
 *          (system line). `nvmlInit` covers all three init entry points.
 *
 * Memory-read counts are kept per GPU while the file stays the same file
 * (device and inode): the Python side replaces it atomically, which starts
 * them again; the Set calls append, which keeps them.
 *
 * Without FAKE_NVML_STATE, or when the file cannot be read, calls return
 * NVML_ERROR_DRIVER_NOT_LOADED, as a host without the NVIDIA driver does.
 * Device handles point into a static table; a handle whose GPU has left the
 * state file answers NVML_ERROR_GPU_IS_LOST.
 */

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define EXPORT __attribute__((visibility("default")))

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_ALREADY_INITIALIZED = 5,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_INSUFFICIENT_POWER = 8,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_IRQ_ISSUE = 11,
    NVML_ERROR_LIBRARY_NOT_FOUND = 12,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_CORRUPTED_INFOROM = 14,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_RESET_REQUIRED = 16,
    NVML_ERROR_OPERATING_SYSTEM = 17,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_IN_USE = 19,
    NVML_ERROR_MEMORY = 20,
    NVML_ERROR_NO_DATA = 21,
    NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22,
    NVML_ERROR_INSUFFICIENT_RESOURCES = 23,
    NVML_ERROR_FREQ_NOT_SUPPORTED = 24,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_DEPRECATED = 26,
    NVML_ERROR_NOT_READY = 27,
    NVML_ERROR_GPU_NOT_FOUND = 28,
    NVML_ERROR_INVALID_STATE = 29,
    NVML_ERROR_RESET_TYPE_NOT_SUPPORTED = 30,
    NVML_ERROR_UNKNOWN = 999,
};

#define NVML_TEMPERATURE_GPU 0
#define NVML_COMPUTEMODE_EXCLUSIVE_THREAD 1 /* support removed from the driver */
#define NVML_COMPUTEMODE_COUNT 4
#define NVML_VALUE_NOT_AVAILABLE_ULL (~0ULL)
#define NVML_VALUE_NOT_AVAILABLE_UINT (~0U)

#define FAKE_DEFAULT_DRIVER "580.105.08"
#define FAKE_NVML_MAJOR "13"
#define MAX_GPUS 16
#define MAX_PROCS 64
#define MAX_FAILS 16
#define MAX_SETS 1024
#define STR_LEN 96
#define LINE_LEN 4096

/* ---- the ABI: structs as nvml.h lays them out ---- */

struct nvmlDevice_st {
    char unused;
};
typedef struct nvmlDevice_st *nvmlDevice_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int version;
    int sensorType;
    int temperature;
} nvmlTemperature_v1_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

#define STRUCT_VERSION(type, ver) ((unsigned int)(sizeof(type) | ((unsigned int)(ver) << 24U)))

_Static_assert(sizeof(nvmlPciInfo_t) == 68, "nvmlPciInfo_t layout");
_Static_assert(STRUCT_VERSION(nvmlMemory_v2_t, 2) == 0x02000028U, "nvmlMemory_v2 version");
_Static_assert(STRUCT_VERSION(nvmlTemperature_v1_t, 1) == 0x0100000CU, "nvmlTemperature_v1 version");
_Static_assert(sizeof(nvmlProcessInfo_t) == 24, "nvmlProcessInfo_t layout");

/* ---- the state file ---- */

typedef struct {
    int present;   /* given, and not `na` */
    unsigned long long value;
} number_t;

typedef struct {
    char function[64];
    int code;
} failure_t;

typedef struct {
    failure_t items[MAX_FAILS];
    int count;
} failures_t;

typedef struct {
    int index;
    char uuid[STR_LEN];
    char name[STR_LEN];
    char pci_bus_id[STR_LEN];
    unsigned int domain, bus, device, function;
    number_t memory_total, memory_used, memory_reserved;
    number_t utilization, temperature, power_usage_mw, power_limit_mw;
    number_t power_min_mw, power_max_mw, power_default_mw, persistence, compute_mode;
    int lost;
    failures_t failures;
} gpu_t;

typedef struct {
    unsigned int gpu;
    unsigned int pid;
    number_t memory;
    char name[STR_LEN];
    int gone;
    unsigned int release_after;
} process_t;

typedef struct {
    unsigned int gpu;
    number_t power_limit_mw, persistence, compute_mode;
} setting_t;

typedef struct {
    char driver[80]; /* NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE */
    char nvml[STR_LEN];
    failures_t failures;
    gpu_t gpus[MAX_GPUS];
    int gpu_count;
    process_t processes[MAX_PROCS];
    int process_count;
    setting_t settings[MAX_SETS];
    int setting_count;
    int root;
    dev_t file_device;
    ino_t file_inode;
} state_t;

static struct nvmlDevice_st devices[MAX_GPUS];
static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;
static int init_count = 0;

/* Memory reads per GPU since the state file (this device and inode) was written. */
static pthread_mutex_t reads_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned int memory_reads[MAX_GPUS];
static dev_t reads_device;
static ino_t reads_inode;

static int complain(const char *path, int line, const char *what, const char *detail) {
    fprintf(stderr, "fake_nvml: %s:%d: %s%s%s\n", path, line, what, detail ? ": " : "", detail ? detail : "");
    return 0;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decode %XX escapes of `src` into `dst` (size `size`); 0 when malformed or too long. */
static int decode(char *dst, size_t size, const char *src) {
    size_t n = 0;
    while (*src) {
        int c = (unsigned char)*src;
        if (c == '%') {
            int hi = hex_digit(src[1]);
            int lo = hi < 0 ? -1 : hex_digit(src[2]);
            if (lo < 0) return 0;
            c = hi * 16 + lo;
            src += 3;
        } else {
            src++;
        }
        if (n + 1 >= size) return 0;
        dst[n++] = (char)c;
    }
    dst[n] = '\0';
    return 1;
}

static int parse_number(number_t *out, const char *text) {
    char *end = NULL;
    if (strcmp(text, "na") == 0) {
        out->present = 0;
        return 1;
    }
    if (*text == '\0' || *text == '-') return 0;
    errno = 0;
    out->value = strtoull(text, &end, 0);
    if (errno != 0 || *end != '\0') return 0;
    out->present = 1;
    return 1;
}

static int parse_uint(unsigned int *out, const char *text) {
    number_t n = {0, 0};
    if (!parse_number(&n, text) || !n.present || n.value > 0xFFFFFFFFULL) return 0;
    *out = (unsigned int)n.value;
    return 1;
}

/* "DDDDDDDD:BB:DD.F" or "BB:DD.F", hex, any case. */
static int parse_bus_id(const char *text, unsigned int *domain, unsigned int *bus, unsigned int *device,
                        unsigned int *function) {
    int used = 0;
    *domain = 0;
    if (sscanf(text, "%x:%x:%x.%x%n", domain, bus, device, function, &used) == 4 && text[used] == '\0') return 1;
    used = 0;
    *domain = 0;
    if (sscanf(text, "%x:%x.%x%n", bus, device, function, &used) == 3 && text[used] == '\0') return 1;
    return 0;
}

static int parse_failures(failures_t *out, const char *text) {
    char copy[LINE_LEN];
    char *save = NULL;
    if (strlen(text) >= sizeof copy) return 0;
    strcpy(copy, text);
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *colon = strchr(item, ':');
        unsigned int code = 0;
        if (!colon || out->count >= MAX_FAILS) return 0;
        *colon = '\0';
        if (strlen(item) >= sizeof out->items[0].function || !parse_uint(&code, colon + 1)) return 0;
        strcpy(out->items[out->count].function, item);
        out->items[out->count].code = (int)code;
        out->count++;
    }
    return 1;
}

static int failure_for(const failures_t *failures, const char *function) {
    for (int i = 0; i < failures->count; i++) {
        if (strcmp(failures->items[i].function, function) == 0) return failures->items[i].code;
    }
    return NVML_SUCCESS;
}

static int parse_system(state_t *s, const char *key, const char *value) {
    if (strcmp(key, "driver") == 0) return decode(s->driver, sizeof s->driver, value);
    if (strcmp(key, "nvml") == 0) return decode(s->nvml, sizeof s->nvml, value);
    if (strcmp(key, "fail") == 0) return parse_failures(&s->failures, value);
    if (strcmp(key, "root") == 0) {
        unsigned int root = 0;
        if (!parse_uint(&root, value) || root > 1) return 0;
        s->root = (int)root;
        return 1;
    }
    return 0;
}

static int parse_gpu(gpu_t *g, const char *key, const char *value) {
    unsigned int number = 0;
    if (strcmp(key, "index") == 0) {
        if (!parse_uint(&number, value) || number >= MAX_GPUS) return 0;
        g->index = (int)number;
        return 1;
    }
    if (strcmp(key, "uuid") == 0) return decode(g->uuid, sizeof g->uuid, value);
    if (strcmp(key, "name") == 0) return decode(g->name, sizeof g->name, value);
    if (strcmp(key, "pci_bus_id") == 0)
        return decode(g->pci_bus_id, sizeof g->pci_bus_id, value) &&
               parse_bus_id(g->pci_bus_id, &g->domain, &g->bus, &g->device, &g->function);
    if (strcmp(key, "memory_total") == 0) return parse_number(&g->memory_total, value);
    if (strcmp(key, "memory_used") == 0) return parse_number(&g->memory_used, value);
    if (strcmp(key, "memory_reserved") == 0) return parse_number(&g->memory_reserved, value);
    if (strcmp(key, "utilization") == 0) return parse_number(&g->utilization, value);
    if (strcmp(key, "temperature") == 0) return parse_number(&g->temperature, value);
    if (strcmp(key, "power_usage_mw") == 0) return parse_number(&g->power_usage_mw, value);
    if (strcmp(key, "power_limit_mw") == 0) return parse_number(&g->power_limit_mw, value);
    if (strcmp(key, "power_min_mw") == 0) return parse_number(&g->power_min_mw, value);
    if (strcmp(key, "power_max_mw") == 0) return parse_number(&g->power_max_mw, value);
    if (strcmp(key, "power_default_mw") == 0) return parse_number(&g->power_default_mw, value);
    if (strcmp(key, "persistence") == 0) return parse_number(&g->persistence, value);
    if (strcmp(key, "compute_mode") == 0) return parse_number(&g->compute_mode, value);
    if (strcmp(key, "lost") == 0) {
        if (!parse_uint(&number, value) || number > 1) return 0;
        g->lost = (int)number;
        return 1;
    }
    if (strcmp(key, "fail") == 0) return parse_failures(&g->failures, value);
    return 0;
}

static int parse_process(process_t *p, const char *key, const char *value) {
    if (strcmp(key, "gpu") == 0) return parse_uint(&p->gpu, value);
    if (strcmp(key, "pid") == 0) return parse_uint(&p->pid, value);
    if (strcmp(key, "memory") == 0) return parse_number(&p->memory, value);
    if (strcmp(key, "name") == 0) return decode(p->name, sizeof p->name, value);
    if (strcmp(key, "gone") == 0) {
        unsigned int gone = 0;
        if (!parse_uint(&gone, value) || gone > 1) return 0;
        p->gone = (int)gone;
        return 1;
    }
    if (strcmp(key, "release_after") == 0) return parse_uint(&p->release_after, value);
    return 0;
}

static int parse_setting(setting_t *t, const char *key, const char *value) {
    if (strcmp(key, "gpu") == 0) return parse_uint(&t->gpu, value);
    if (strcmp(key, "power_limit_mw") == 0) return parse_number(&t->power_limit_mw, value);
    if (strcmp(key, "persistence") == 0) return parse_number(&t->persistence, value);
    if (strcmp(key, "compute_mode") == 0) return parse_number(&t->compute_mode, value);
    return 0;
}

/* The Set calls' lines, in order, over the GPUs they name. */
static int apply_settings(state_t *s, const char *path) {
    for (int i = 0; i < s->setting_count; i++) {
        const setting_t *t = &s->settings[i];
        gpu_t *g;
        if (t->gpu >= (unsigned int)s->gpu_count) return complain(path, 0, "a set line names a missing gpu", NULL);
        g = &s->gpus[t->gpu];
        if (t->power_limit_mw.present) g->power_limit_mw = t->power_limit_mw;
        if (t->persistence.present) g->persistence = t->persistence;
        if (t->compute_mode.present) g->compute_mode = t->compute_mode;
    }
    return 1;
}

/* Check the parsed file and order the GPUs by index; 0 (after complaining) when inconsistent. */
static int finish_state(state_t *s, const char *path) {
    gpu_t ordered[MAX_GPUS];
    int seen[MAX_GPUS] = {0};
    for (int i = 0; i < s->gpu_count; i++) {
        gpu_t *g = &s->gpus[i];
        if (g->index < 0) g->index = i;
        if (g->index >= s->gpu_count || seen[g->index]) return complain(path, 0, "gpu indexes must be 0..n-1", NULL);
        if (!g->uuid[0] || !g->name[0] || !g->pci_bus_id[0])
            return complain(path, 0, "every gpu needs uuid, name and pci_bus_id", NULL);
        seen[g->index] = 1;
        ordered[g->index] = *g;
    }
    memcpy(s->gpus, ordered, sizeof(gpu_t) * (size_t)s->gpu_count);
    for (int i = 0; i < s->process_count; i++) {
        if (s->processes[i].gpu >= (unsigned int)s->gpu_count || s->processes[i].pid == 0)
            return complain(path, 0, "a process needs a pid and the index of an existing gpu", NULL);
    }
    if (!apply_settings(s, path)) return 0;
    if (!s->driver[0]) strcpy(s->driver, FAKE_DEFAULT_DRIVER);
    if (!s->nvml[0]) snprintf(s->nvml, sizeof s->nvml, "%s.%s", FAKE_NVML_MAJOR, s->driver);
    return 1;
}

static nvmlReturn_t parse_file(state_t *s, FILE *file, const char *path) {
    char line[LINE_LEN];
    int number = 0;
    while (fgets(line, sizeof line, file)) {
        char *save = NULL;
        char *kind;
        number++;
        if (!strchr(line, '\n') && !feof(file)) {
            complain(path, number, "line too long", NULL);
            return NVML_ERROR_UNKNOWN;
        }
        kind = strtok_r(line, " \t\r\n", &save);
        if (!kind || kind[0] == '#') continue;
        gpu_t *gpu = NULL;
        process_t *process = NULL;
        setting_t *setting = NULL;
        if (strcmp(kind, "gpu") == 0) {
            if (s->gpu_count >= MAX_GPUS) {
                complain(path, number, "too many gpus", NULL);
                return NVML_ERROR_UNKNOWN;
            }
            gpu = &s->gpus[s->gpu_count++];
            gpu->index = -1;
            gpu->persistence.present = 1;
            gpu->compute_mode.present = 1;
        } else if (strcmp(kind, "process") == 0) {
            if (s->process_count >= MAX_PROCS) {
                complain(path, number, "too many processes", NULL);
                return NVML_ERROR_UNKNOWN;
            }
            process = &s->processes[s->process_count++];
        } else if (strcmp(kind, "set") == 0) {
            if (s->setting_count >= MAX_SETS) {
                complain(path, number, "too many set lines", NULL);
                return NVML_ERROR_UNKNOWN;
            }
            setting = &s->settings[s->setting_count++];
        } else if (strcmp(kind, "system") != 0) {
            complain(path, number, "unknown record", kind);
            return NVML_ERROR_UNKNOWN;
        }
        for (char *pair = strtok_r(NULL, " \t\r\n", &save); pair; pair = strtok_r(NULL, " \t\r\n", &save)) {
            char *eq = strchr(pair, '=');
            int ok;
            if (!eq) {
                complain(path, number, "expected key=value", pair);
                return NVML_ERROR_UNKNOWN;
            }
            *eq = '\0';
            if (gpu)
                ok = parse_gpu(gpu, pair, eq + 1);
            else if (process)
                ok = parse_process(process, pair, eq + 1);
            else if (setting)
                ok = parse_setting(setting, pair, eq + 1);
            else
                ok = parse_system(s, pair, eq + 1);
            if (!ok) {
                complain(path, number, "bad key or value", pair);
                return NVML_ERROR_UNKNOWN;
            }
        }
    }
    if (ferror(file)) {
        complain(path, number, "read error", strerror(errno));
        return NVML_ERROR_UNKNOWN;
    }
    return finish_state(s, path) ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
}

/* Read the state file into a new state (the caller frees it). */
static nvmlReturn_t load_state(state_t **out) {
    const char *path = getenv("FAKE_NVML_STATE");
    FILE *file;
    state_t *s;
    nvmlReturn_t result;
    *out = NULL;
    if (!path || !*path) return NVML_ERROR_DRIVER_NOT_LOADED;
    file = fopen(path, "r");
    if (!file) return NVML_ERROR_DRIVER_NOT_LOADED;
    s = calloc(1, sizeof *s);
    if (!s) {
        fclose(file);
        return NVML_ERROR_MEMORY;
    }
    s->root = 1;
    {
        struct stat info;
        if (fstat(fileno(file), &info) == 0) {
            s->file_device = info.st_dev;
            s->file_inode = info.st_ino;
        }
    }
    result = parse_file(s, file, path);
    fclose(file);
    if (result != NVML_SUCCESS) {
        free(s);
        return result;
    }
    *out = s;
    return NVML_SUCCESS;
}

static int initialised(void) {
    int count;
    pthread_mutex_lock(&init_lock);
    count = init_count;
    pthread_mutex_unlock(&init_lock);
    return count > 0;
}

/* Preamble of every system call: initialised, state readable, no injected failure. */
static nvmlReturn_t system_begin(const char *function, state_t **out) {
    nvmlReturn_t result;
    *out = NULL;
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    result = load_state(out);
    if (result != NVML_SUCCESS) return result;
    return failure_for(&(*out)->failures, function);
}

static nvmlReturn_t gpu_checks(const gpu_t *gpu, const char *function) {
    if (gpu->lost) return NVML_ERROR_GPU_IS_LOST;
    return failure_for(&gpu->failures, function);
}

/* Preamble of every device call: also finds the GPU behind `device`. */
static nvmlReturn_t device_begin(nvmlDevice_t device, const char *function, state_t **out, const gpu_t **gpu) {
    uintptr_t at = (uintptr_t)device, first = (uintptr_t)&devices[0];
    size_t index;
    nvmlReturn_t result;
    *out = NULL;
    *gpu = NULL;
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    if (at < first || at >= first + sizeof devices) return NVML_ERROR_INVALID_ARGUMENT;
    index = (at - first) / sizeof devices[0];
    result = load_state(out);
    if (result != NVML_SUCCESS) return result;
    if (index >= (size_t)(*out)->gpu_count) return NVML_ERROR_GPU_IS_LOST;
    *gpu = &(*out)->gpus[index];
    return gpu_checks(*gpu, function);
}

static nvmlReturn_t copy_string(char *dst, unsigned int length, const char *src) {
    size_t n = strlen(src);
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    if ((size_t)length < n + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, n + 1);
    return NVML_SUCCESS;
}

static nvmlReturn_t put_uint(unsigned int *dst, const number_t *n) {
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    if (!n->present) return NVML_ERROR_NOT_SUPPORTED;
    *dst = (unsigned int)n->value;
    return NVML_SUCCESS;
}

/* ---- init and shutdown ---- */

static nvmlReturn_t do_init(void) {
    state_t *s = NULL;
    nvmlReturn_t result = load_state(&s);
    if (result == NVML_SUCCESS) result = failure_for(&s->failures, "nvmlInit");
    free(s);
    if (result != NVML_SUCCESS) return result;
    pthread_mutex_lock(&init_lock);
    init_count++;
    pthread_mutex_unlock(&init_lock);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlInit(void) { return do_init(); }

EXPORT nvmlReturn_t nvmlInit_v2(void) { return do_init(); }

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return do_init();
}

EXPORT nvmlReturn_t nvmlShutdown(void) {
    nvmlReturn_t result = NVML_SUCCESS;
    pthread_mutex_lock(&init_lock);
    if (init_count > 0)
        init_count--;
    else
        result = NVML_ERROR_UNINITIALIZED;
    pthread_mutex_unlock(&init_lock);
    return result;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_INSUFFICIENT_POWER: return "Insufficient External Power";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_IRQ_ISSUE: return "Interrupt Request Issue";
    case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_CORRUPTED_INFOROM: return "Corrupted infoROM";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_OPERATING_SYSTEM: return "The operating system has blocked the request.";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    case NVML_ERROR_IN_USE: return "In use by another client";
    case NVML_ERROR_MEMORY: return "Insufficient Memory";
    case NVML_ERROR_NO_DATA: return "No data";
    case NVML_ERROR_INSUFFICIENT_RESOURCES: return "Insufficient resources";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    case NVML_ERROR_NOT_READY: return "Not ready";
    case NVML_ERROR_GPU_NOT_FOUND: return "GPU not found";
    default: return "Unknown Error";
    }
}

/* ---- system queries ---- */

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    state_t *s = NULL;
    nvmlReturn_t result = system_begin(__func__, &s);
    if (result == NVML_SUCCESS) result = copy_string(version, length, s->driver);
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    state_t *s = NULL;
    nvmlReturn_t result = system_begin(__func__, &s);
    if (result == NVML_SUCCESS) result = copy_string(version, length, s->nvml);
    free(s);
    return result;
}

/* Like the real call, a name longer than `length` is cut short rather than refused. */
EXPORT nvmlReturn_t nvmlSystemGetProcessName(unsigned int pid, char *name, unsigned int length) {
    state_t *s = NULL;
    nvmlReturn_t result = system_begin(__func__, &s);
    if (result == NVML_SUCCESS && (!name || length == 0)) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) {
        result = NVML_ERROR_NOT_FOUND;
        for (int i = 0; i < s->process_count; i++) {
            if (s->processes[i].pid == pid && s->processes[i].name[0] && !s->processes[i].gone) {
                snprintf(name, length, "%s", s->processes[i].name);
                result = NVML_SUCCESS;
                break;
            }
        }
    }
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount) {
    state_t *s = NULL;
    nvmlReturn_t result = system_begin(__func__, &s);
    if (result == NVML_SUCCESS && !deviceCount) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) *deviceCount = (unsigned int)s->gpu_count;
    free(s);
    return result;
}

/* ---- handles ---- */

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    state_t *s = NULL;
    nvmlReturn_t result = system_begin(__func__, &s);
    if (result == NVML_SUCCESS && (!device || index >= (unsigned int)s->gpu_count))
        result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) result = gpu_checks(&s->gpus[index], __func__);
    if (result == NVML_SUCCESS) *device = &devices[index];
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    state_t *s = NULL;
    nvmlReturn_t result = system_begin(__func__, &s);
    if (result == NVML_SUCCESS && (!uuid || !device)) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) {
        result = NVML_ERROR_NOT_FOUND;
        for (int i = 0; i < s->gpu_count; i++) {
            if (strcmp(s->gpus[i].uuid, uuid) == 0) {
                result = gpu_checks(&s->gpus[i], __func__);
                if (result == NVML_SUCCESS) *device = &devices[i];
                break;
            }
        }
    }
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device) {
    state_t *s = NULL;
    unsigned int domain, bus, dev, function;
    nvmlReturn_t result = system_begin(__func__, &s);
    if (result == NVML_SUCCESS && (!pciBusId || !device || !parse_bus_id(pciBusId, &domain, &bus, &dev, &function)))
        result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) {
        result = NVML_ERROR_NOT_FOUND;
        for (int i = 0; i < s->gpu_count; i++) {
            const gpu_t *g = &s->gpus[i];
            if (g->domain == domain && g->bus == bus && g->device == dev && g->function == function) {
                result = gpu_checks(g, __func__);
                if (result == NVML_SUCCESS) *device = &devices[i];
                break;
            }
        }
    }
    free(s);
    return result;
}

/* ---- device queries ---- */

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS && !index) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) *index = (unsigned int)g->index;
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS) result = copy_string(uuid, length, g->uuid);
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS) result = copy_string(name, length, g->name);
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS && !pci) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) {
        memset(pci, 0, sizeof *pci);
        /* The real library writes upper-case hex, an 8-digit domain in busId and 4 digits in the legacy field. */
        snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.%X", g->domain & 0xFFFFU, g->bus & 0xFFU,
                 g->device & 0x1FU, g->function & 0x7U);
        snprintf(pci->busId, sizeof pci->busId, "%08X:%02X:%02X.%X", g->domain, g->bus & 0xFFU, g->device & 0x1FU,
                 g->function & 0x7U);
        pci->domain = g->domain;
        pci->bus = g->bus;
        pci->device = g->device;
        pci->pciDeviceId = 0x10DEU;
        pci->pciSubSystemId = 0;
    }
    free(s);
    return result;
}

/* Count one memory read of `g`; the memory of exited processes the driver has not freed yet. */
static unsigned long long lingering_memory(const state_t *s, const gpu_t *g) {
    unsigned int reads;
    unsigned long long held = 0;
    pthread_mutex_lock(&reads_lock);
    if (reads_device != s->file_device || reads_inode != s->file_inode) {
        memset(memory_reads, 0, sizeof memory_reads);
        reads_device = s->file_device;
        reads_inode = s->file_inode;
    }
    reads = ++memory_reads[g->index];
    pthread_mutex_unlock(&reads_lock);
    for (int i = 0; i < s->process_count; i++) {
        const process_t *p = &s->processes[i];
        if (p->gone && p->gpu == (unsigned int)g->index && p->memory.present && reads <= p->release_after)
            held += p->memory.value;
    }
    return held;
}

static void memory_split(const state_t *s, const gpu_t *g, unsigned long long *used, unsigned long long *reserved,
                         unsigned long long *free_bytes) {
    unsigned long long total = g->memory_total.value;
    *used = (g->memory_used.present ? g->memory_used.value : 0) + lingering_memory(s, g);
    *reserved = g->memory_reserved.present ? g->memory_reserved.value : 0;
    *free_bytes = (*used + *reserved >= total) ? 0 : total - *used - *reserved;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    unsigned long long used, reserved, free_bytes;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS && !memory) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS && !g->memory_total.present) result = NVML_ERROR_NOT_SUPPORTED;
    if (result == NVML_SUCCESS) {
        memory_split(s, g, &used, &reserved, &free_bytes);
        memory->total = g->memory_total.value;
        memory->free = free_bytes;
        memory->used = memory->total - free_bytes;
    }
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    unsigned long long used, reserved, free_bytes;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS && !memory) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS && memory->version != STRUCT_VERSION(nvmlMemory_v2_t, 2))
        result = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (result == NVML_SUCCESS && !g->memory_total.present) result = NVML_ERROR_NOT_SUPPORTED;
    if (result == NVML_SUCCESS) {
        memory_split(s, g, &used, &reserved, &free_bytes);
        memory->total = g->memory_total.value;
        memory->reserved = reserved;
        memory->free = free_bytes;
        memory->used = memory->total - free_bytes - reserved;
    }
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS && !utilization) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) result = put_uint(&utilization->gpu, &g->utilization);
    if (result == NVML_SUCCESS) utilization->memory = 0;
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensorType, unsigned int *temp) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS && sensorType != NVML_TEMPERATURE_GPU) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) result = put_uint(temp, &g->temperature);
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_v1_t *temperature) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS && !temperature) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS && temperature->version != STRUCT_VERSION(nvmlTemperature_v1_t, 1))
        result = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (result == NVML_SUCCESS && temperature->sensorType != NVML_TEMPERATURE_GPU)
        result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS && !g->temperature.present) result = NVML_ERROR_NOT_SUPPORTED;
    if (result == NVML_SUCCESS) temperature->temperature = (int)g->temperature.value;
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS) result = put_uint(power, &g->power_usage_mw);
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS) result = put_uint(limit, &g->power_limit_mw);
    free(s);
    return result;
}

/*
 * The two-call protocol of the real library: with *infoCount too small (0 and
 * infos NULL to ask), return INSUFFICIENT_SIZE and the count needed; with
 * room, fill infos and set *infoCount to the number written.
 */
static nvmlReturn_t compute_processes(nvmlDevice_t device, const char *function, unsigned int *infoCount,
                                      nvmlProcessInfo_t *infos) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    unsigned int needed = 0, written = 0;
    nvmlReturn_t result = device_begin(device, function, &s, &g);
    if (result == NVML_SUCCESS && !infoCount) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) {
        for (int i = 0; i < s->process_count; i++)
            needed += s->processes[i].gpu == (unsigned int)g->index && !s->processes[i].gone;
        if (*infoCount < needed) {
            *infoCount = needed;
            result = NVML_ERROR_INSUFFICIENT_SIZE;
        } else if (needed > 0 && !infos) {
            result = NVML_ERROR_INVALID_ARGUMENT;
        }
    }
    if (result == NVML_SUCCESS) {
        for (int i = 0; i < s->process_count; i++) {
            const process_t *p = &s->processes[i];
            if (p->gpu != (unsigned int)g->index || p->gone) continue;
            infos[written].pid = p->pid;
            infos[written].usedGpuMemory = p->memory.present ? p->memory.value : NVML_VALUE_NOT_AVAILABLE_ULL;
            infos[written].gpuInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT;
            infos[written].computeInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT;
            written++;
        }
        *infoCount = written;
    }
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                             nvmlProcessInfo_t *infos) {
    return compute_processes(device, __func__, infoCount, infos);
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                             nvmlProcessInfo_t *infos) {
    return compute_processes(device, __func__, infoCount, infos);
}

/* ---- power, persistence and compute mode: read and set ---- */

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS) result = put_uint(limit, &g->power_limit_mw);
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t device, unsigned int *limit) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS) result = put_uint(limit, &g->power_default_mw);
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(nvmlDevice_t device, unsigned int *minLimit,
                                                                 unsigned int *maxLimit) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS) result = put_uint(minLimit, &g->power_min_mw);
    if (result == NVML_SUCCESS) result = put_uint(maxLimit, &g->power_max_mw);
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetPersistenceMode(nvmlDevice_t device, int *mode) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    unsigned int value = 0;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS && !mode) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) result = put_uint(&value, &g->persistence);
    if (result == NVML_SUCCESS) *mode = (int)value;
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeMode(nvmlDevice_t device, int *mode) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    unsigned int value = 0;
    nvmlReturn_t result = device_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS && !mode) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) result = put_uint(&value, &g->compute_mode);
    if (result == NVML_SUCCESS) *mode = (int)value;
    free(s);
    return result;
}

/* Record a setting of GPU `index` by appending a `set` line to the state file. */
static nvmlReturn_t append_setting(int index, const char *key, unsigned long long value) {
    const char *path = getenv("FAKE_NVML_STATE");
    FILE *file = path ? fopen(path, "a") : NULL;
    int written;
    if (!file) return NVML_ERROR_UNKNOWN;
    written = fprintf(file, "set gpu=%d %s=%llu\n", index, key, value);
    if (fclose(file) != 0 || written < 0) return NVML_ERROR_UNKNOWN;
    return NVML_SUCCESS;
}

/* Preamble of every Set call: the device, then root (the driver checks permission before the value). */
static nvmlReturn_t set_begin(nvmlDevice_t device, const char *function, state_t **s, const gpu_t **g) {
    nvmlReturn_t result = device_begin(device, function, s, g);
    if (result == NVML_SUCCESS && !(*s)->root) result = NVML_ERROR_NO_PERMISSION;
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t device, unsigned int limit) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = set_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS && (!g->power_min_mw.present || !g->power_max_mw.present))
        result = NVML_ERROR_NOT_SUPPORTED;
    if (result == NVML_SUCCESS && (limit < g->power_min_mw.value || limit > g->power_max_mw.value))
        result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) result = append_setting(g->index, "power_limit_mw", limit);
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceSetPersistenceMode(nvmlDevice_t device, int mode) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = set_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS && !g->persistence.present) result = NVML_ERROR_NOT_SUPPORTED;
    if (result == NVML_SUCCESS && mode != 0 && mode != 1) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS) result = append_setting(g->index, "persistence", (unsigned long long)mode);
    free(s);
    return result;
}

EXPORT nvmlReturn_t nvmlDeviceSetComputeMode(nvmlDevice_t device, int mode) {
    state_t *s = NULL;
    const gpu_t *g = NULL;
    nvmlReturn_t result = set_begin(device, __func__, &s, &g);
    if (result == NVML_SUCCESS && !g->compute_mode.present) result = NVML_ERROR_NOT_SUPPORTED;
    if (result == NVML_SUCCESS && (mode < 0 || mode >= NVML_COMPUTEMODE_COUNT)) result = NVML_ERROR_INVALID_ARGUMENT;
    if (result == NVML_SUCCESS && mode == NVML_COMPUTEMODE_EXCLUSIVE_THREAD) result = NVML_ERROR_NOT_SUPPORTED;
    if (result == NVML_SUCCESS) result = append_setting(g->index, "compute_mode", (unsigned long long)mode);
    free(s);
    return result;
}
