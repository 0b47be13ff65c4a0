"""Memory freed by `release_optimizer_state`, and its effect on step time.

`freeze_layers` keeps the optimizer's slots for the frozen weights (Adam: two
float32 copies of every weight); `keras_smartfrz.release_optimizer_state`
frees them. On an MLP whose front layers hold most of the weights (default:
784 -> 4 x 1024 -> 10, 3.9M parameters, the first 3 hidden layers frozen,
74% of the weights), this reports:

1. Memory, in a process that holds one model only: the bytes of the
   optimizer's variables, the process RSS (from /proc/self/statm) and, where
   TensorFlow reports it for the CPU, its allocator's bytes in use; after
   training, after freezing, and after releasing (each after `gc.collect()`).
2. Step time of the released and of the not-released optimizer, measured
   side by side in one process: two copies of the model (same seed, same
   batches) take turns, `--steps` train steps each per round, for `--rounds`
   rounds, after one warm-up round. The ratio is released / not released
   (below 1: the released step is faster). The two copies' weights are then
   compared (they must be bit-identical).

Synthetic inputs (normal noise, random labels): neither memory nor step time
depends on the values.

    python benchmarks/optimizer_memory.py

writes benchmarks/results/optimizer_memory.md and .json.
"""

import argparse
import gc
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
import weakref

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_smartfrz  # noqa: E402
from keras_smartfrz import optimizer_state  # noqa: E402
from keras_smartfrz.optimizer_state import _slot_owners as slot_owners  # noqa: E402,E501

tf.get_logger().setLevel("ERROR")  # the retracing notices of the rebuilt steps

RESULTS = pathlib.Path(__file__).parent / "results"
MARKER = "MEMORY-RESULT "
MB = 1024 * 1024


def build_mlp(width, depth, inputs=784, classes=10, jit_compile=False):
    layers = [keras.Input((inputs,))]
    layers += [
        keras.layers.Dense(width, activation="relu", name=f"dense{i}")
        for i in range(depth)
    ]
    layers.append(keras.layers.Dense(classes, name="head"))
    model = keras.Sequential(layers, name="mlp")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def optimizer_bytes(optimizer):
    return int(sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
        for v in optimizer.variables
    ))


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_trim():
    """Asks glibc to return freed heap memory to the system; False if not
    glibc. Freed blocks of a few MB are often kept by malloc for reuse (its
    mmap threshold grows as large blocks are freed), so RSS alone does not
    show memory freed inside the process."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def tf_bytes_in_use():
    try:
        return int(tf.config.experimental.get_memory_info("CPU:0")["current"])
    except (ValueError, RuntimeError):
        return None  # not tracked for the CPU in this TensorFlow build


def memory(optimizer):
    gc.collect()
    rss = rss_bytes()
    trimmed = rss_bytes() if malloc_trim() else None
    return {
        "optimizer_bytes": optimizer_bytes(optimizer),
        "rss_bytes": rss,
        "rss_bytes_after_malloc_trim": trimmed,
        "tf_bytes_in_use": tf_bytes_in_use(),
    }


def frozen_variables(model, names):
    return [v for name in names for v in model.get_layer(name).weights]


def make(args, seed):
    keras.utils.set_random_seed(seed)
    return build_mlp(args.width, args.depth, jit_compile=args.jit)


def train_steps(model, batches):
    for x, y in batches:
        model.train_on_batch(x, y)


def measure_memory(args, batches, frozen):
    """One model in the process: before/after freezing and releasing."""
    model = make(args, args.seed)
    train_steps(model, batches)
    states = {"trained": memory(model.optimizer)}
    keras_smartfrz.freeze_layers(model, frozen)
    train_steps(model, batches[:1])  # the rebuilt step, traced once
    states["frozen"] = memory(model.optimizer)
    frozen_ids = {id(v) for v in frozen_variables(model, frozen)}
    owners = slot_owners(model.optimizer)
    slots = [v for v in model.optimizer.variables
             if owners.get(id(v)) in frozen_ids]
    watch = [weakref.ref(v) for v in slots]  # Keras variables,
    watch += [weakref.ref(v.value) for v in slots]  # their tf.Variables
    watch += [weakref.ref(v.value.handle) for v in slots]  # and handles
    del slots
    if not args.registry_cleanup:
        # The control: what the release frees without dropping TensorFlow's
        # gradient registry entries that pin the old train step's graph.
        optimizer_state._forget_train_graphs = lambda slots: 0
    released = keras_smartfrz.release_optimizer_state(
        model.optimizer, frozen_variables(model, frozen)
    )
    # The step traced above still captures the released slots: rebuild it
    # (a freezing callback releases before its rebuild, which does this).
    keras_smartfrz.rebuild_train_step(model)
    train_steps(model, batches[:1])
    states["released"] = memory(model.optimizer)
    count = len(watch) // 3
    states["released"]["alive_of_watched"] = [
        sum(r() is not None for r in watch[i * count:(i + 1) * count])
        for i in range(3)
    ]  # [Keras variables, tf.Variables, resource handles] still alive
    states["released"]["watched_slots"] = count
    params = model.count_params()
    frozen_params = int(sum(
        int(np.prod(v.shape)) for v in frozen_variables(model, frozen)
    ))
    del model
    gc.collect()
    return states, released, params, frozen_params


def measure_step_time(args, batches, frozen):
    """Released and not released copies, alternating, in one process."""
    models = {}
    for name in ("released", "kept"):
        model = make(args, args.seed)
        train_steps(model, batches[:2])  # builds the optimizer
        keras_smartfrz.freeze_layers(model, frozen)
        if name == "released":
            keras_smartfrz.release_optimizer_state(
                model.optimizer, frozen_variables(model, frozen)
            )
        models[name] = model
    times = {name: [] for name in models}
    rounds = {name: [] for name in models}
    for round_index in range(args.rounds + 1):  # round 0: warm-up
        order = list(models) if round_index % 2 else list(models)[::-1]
        for name in order:
            steps = []
            for x, y in batches[: args.steps]:
                start = time.perf_counter()
                models[name].train_on_batch(x, y)
                steps.append(time.perf_counter() - start)
            if round_index:
                times[name].extend(steps)
                rounds[name].append(float(np.median(steps)))
    identical = all(
        np.array_equal(keras.ops.convert_to_numpy(a),
                       keras.ops.convert_to_numpy(b))
        for a, b in zip(models["released"].weights, models["kept"].weights)
    )
    ratios = [r / k for r, k in zip(rounds["released"], rounds["kept"])]
    return {
        "step_seconds_released": times["released"],
        "step_seconds_kept": times["kept"],
        "median_step_ms_released": 1e3 * float(np.median(times["released"])),
        "median_step_ms_kept": 1e3 * float(np.median(times["kept"])),
        "min_step_ms_released": 1e3 * float(np.min(times["released"])),
        "min_step_ms_kept": 1e3 * float(np.min(times["kept"])),
        "ratio_per_round": ratios,
        "median_ratio": float(np.median(ratios)),
        "ratio_quartiles": [float(np.percentile(ratios, 25)),
                            float(np.percentile(ratios, 75))],
        "ratio_of_min_steps": float(np.min(times["released"])
                                    / np.min(times["kept"])),
        "weights_bit_identical": bool(identical),
    }


def mb(value):
    return "n/a" if value is None else f"{value / MB:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4,
                        help="hidden Dense layers")
    parser.add_argument("--frozen", type=int, default=3,
                        help="front hidden layers frozen")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5,
                        help="train steps per model per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "optimizer_memory"))
    parser.add_argument("--memory-only", action="store_true",
                        help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--no-registry-cleanup", dest="registry_cleanup",
                        action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 < args.frozen < args.depth + 1:
        parser.error(f"--frozen must be in [1, {args.depth}]; "
                     f"received {args.frozen}")

    rng = np.random.default_rng(args.seed)
    batches = [
        (rng.normal(size=(args.batch_size, 784)).astype("float32"),
         rng.integers(0, 10, size=(args.batch_size,)).astype("int32"))
        for _ in range(max(args.steps, 2))
    ]
    frozen = [f"dense{i}" for i in range(args.frozen)]
    if args.memory_only:
        states, released, params, frozen_params = measure_memory(
            args, batches, frozen)
        print(MARKER + json.dumps({
            "memory": states, "released_bytes": released, "params": params,
            "frozen_params": frozen_params}))
        return
    started = time.perf_counter()
    # Each memory measurement in a fresh process holding one model.
    children = {}
    for variant, flags in (("release", []),
                           ("release_without_registry_cleanup",
                            ["--no-registry-cleanup"])):
        model_flags = [f"--width={args.width}", f"--depth={args.depth}",
                       f"--frozen={args.frozen}",
                       f"--batch-size={args.batch_size}",
                       f"--steps={args.steps}", f"--seed={args.seed}"]
        model_flags += ["--jit"] if args.jit else []
        output = subprocess.run(
            [sys.executable, __file__, "--memory-only", *model_flags, *flags],
            check=True, capture_output=True, text=True,
        ).stdout
        children[variant] = json.loads(
            [line for line in output.splitlines()
             if line.startswith(MARKER)][-1][len(MARKER):])
    states = children["release"]["memory"]
    control = children["release_without_registry_cleanup"]["memory"]
    released = children["release"]["released_bytes"]
    params = children["release"]["params"]
    frozen_params = children["release"]["frozen_params"]
    timing = measure_step_time(args, batches, frozen)
    command = "python benchmarks/optimizer_memory.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    result = {
        "command": command.strip(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
        },
        "args": vars(args),
        "params": params,
        "frozen_params": frozen_params,
        "released_bytes": released,
        "memory": states,
        "memory_without_registry_cleanup": control,
        "timing": timing,
        "wall_seconds": time.perf_counter() - started,
    }

    s = states
    def freed(key, states=s):
        before, after = states["frozen"][key], states["released"][key]
        return None if before is None or after is None else before - after

    lines = [
        "# Releasing frozen weights' optimizer state: memory and step time",
        "",
        f"Command: `{result['command']}` ({result['wall_seconds']:.0f} s)",
        "",
        f"Machine: {os.cpu_count()} CPU cores (shared with other jobs), "
        f"{result['machine']['processor']}, keras {keras.__version__}, "
        f"tensorflow {tf.__version__}, jit_compile={args.jit}. MLP 784 -> "
        f"{args.depth} x Dense({args.width}) -> 10 ({params / 1e6:.2f}M "
        f"parameters, {4 * params / MB:.1f} MB), Adam; the first "
        f"{args.frozen} hidden layers frozen with `freeze_layers` "
        f"({frozen_params / 1e6:.2f}M parameters, "
        f"{100 * frozen_params / params:.0f}%). Synthetic batches of "
        f"{args.batch_size}.",
        "",
        "## Memory (a fresh process holding one model)",
        "",
        f"`release_optimizer_state` returned {released} bytes "
        f"({released / MB:.1f} MB).",
        "",
        "| state | optimizer variables (MB) | process RSS (MB) | RSS after `malloc_trim(0)` (MB) | TF CPU allocator in use (MB) |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("trained", "trained, nothing frozen"),
                        ("frozen", "frozen (`freeze_layers`)"),
                        ("released", "frozen + `release_optimizer_state`")):
        lines.append(
            f"| {label} | {mb(s[name]['optimizer_bytes'])} | "
            f"{mb(s[name]['rss_bytes'])} | "
            f"{mb(s[name]['rss_bytes_after_malloc_trim'])} | "
            f"{mb(s[name]['tf_bytes_in_use'])} |"
        )
    alive, control_alive = (
        s["released"]["alive_of_watched"],
        control["released"]["alive_of_watched"],
    )
    lines += [
        "",
        f"Freed by the release (frozen -> released): optimizer variables "
        f"{mb(freed('optimizer_bytes'))} MB, RSS {mb(freed('rss_bytes'))} MB, "
        f"RSS after `malloc_trim(0)` "
        f"{mb(freed('rss_bytes_after_malloc_trim'))} MB (the released slots, "
        "and the graph of the train step traced before the release, which "
        "held them, goes too). Freezing alone frees no optimizer memory.",
        "",
        f"The {s['released']['watched_slots']} released slots were watched "
        "with weakrefs after the train step was rebuilt: still alive "
        f"{alive[0]} Keras variables, {alive[1]} tf.Variables, {alive[2]} "
        "resource handles (a handle keeps its buffer).",
        "",
        "Control, in another fresh process: the same release without "
        "dropping the TensorFlow gradient-registry entries that pin the "
        "train step traced before the release (see "
        "`keras_smartfrz/optimizer_state.py`): still alive "
        f"{control_alive[0]} Keras variables, {control_alive[1]} "
        f"tf.Variables, {control_alive[2]} resource handles; RSS after "
        "`malloc_trim(0)` freed "
        f"{mb(freed('rss_bytes_after_malloc_trim', control))} MB. TensorFlow "
        "keeps the graph of every traced train step for the life of the "
        "process, and with it the handles it captured.",
        "",
        "The plain RSS depends on glibc's malloc, which may keep freed "
        "blocks of this size for the process's next allocations instead of "
        "returning them to the system (between runs of this command the "
        "plain RSS freed by the release varied from about 0 to 31 MB). "
        "`malloc_trim(0)`, called after every measurement, returns them: "
        "that column is the one to compare.",
        "",
        "## Step time, released vs not released (side by side)",
        "",
        f"{args.rounds} rounds of {args.steps} steps per model, alternating "
        "(the order flips every round), after a warm-up round; each step "
        "timed (`train_on_batch`).",
        "",
        "| | median step (ms) | fastest step (ms) |",
        "|---|---|---|",
        f"| released | {timing['median_step_ms_released']:.2f} | "
        f"{timing['min_step_ms_released']:.2f} |",
        f"| not released | {timing['median_step_ms_kept']:.2f} | "
        f"{timing['min_step_ms_kept']:.2f} |",
        "",
        f"Ratio released / not released of each round's median step: median "
        f"{timing['median_ratio']:.3f}, quartiles "
        f"{timing['ratio_quartiles'][0]:.3f}-"
        f"{timing['ratio_quartiles'][1]:.3f}; ratio of the fastest steps "
        f"{timing['ratio_of_min_steps']:.3f} (a single step each, the "
        "noisiest figure on a shared machine). "
        f"Weights of the two copies after the same steps bit-identical: "
        f"{timing['weights_bit_identical']}.",
        "",
        "The step does the same work either way (frozen weights get no "
        "gradient and no update, with or without their slots), so the "
        "ratio is expected to be 1 within noise: releasing saves memory, not "
        "time.",
    ]
    if s["released"]["tf_bytes_in_use"] is None:
        lines += [
            "",
            "`tf.config.experimental.get_memory_info('CPU:0')` is not "
            "available for the CPU in this TensorFlow build (n/a).",
        ]
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    pathlib.Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
