"""What fine-tuning on its own thread and CUDA stream costs the node's decode steps.

``python -m bench.finetune.streams`` runs, for ``--seconds`` each, on SmolLM2 (issue 19):

- decode alone: :meth:`LlamaRunner.step` of ``--running`` sequences (100-token contexts) in a
  loop on the main thread, each step timed up to its stream's synchronization (p50, p99), and
  how long the step took to issue (its Python and kernel-launch time, before the wait);
- training alone: a thread running staged training steps (:class:`StagedStep`, micro-batch
  2 x 128 tokens, LoRA rank 8, gradients zeroed after each step) unit by unit, as
  :meth:`StagedStep.run_all` does, on a side stream of the lowest priority: tokens/s;
- together: both at once, the ratios against alone;
- together, throttled: the training thread sleeps after each unit (each already synchronizes
  its stream) so that it is busy at most ``--duty`` of its time.

On CUDA both together runs are repeated with the decode on a stream of the highest priority
(the lowest is the default streams' own). A decode issued late because the training thread
held the GIL shows in the issue time, one waiting behind training kernels in the rest. The
last, unfinished training step counts by its finished units' share of a warm step's time. On
CPU the same runs just contend for cores (one torch thread each).

``--random-smollm2`` builds SmolLM2-135M with random weights in memory (no weights file, no
network): timings do not depend on weight values. Nothing is written but ``--json``'s file.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.finetune.ceiling import _sync
from inference_node.config import NodeSettings
from inference_node.engine.llama import LlamaRunner, Prefill
from inference_node.loading import from_hf, resolve
from inference_node.lora import Example, FrozenLlama, LoraAdapter, LoraConfig, make_batch
from inference_node.model_types import LanguageModel
from inference_node.models import ByteTokenizer, load_language_model
from inference_node.native import default_inv_freq
from inference_node.training import StagedStep

Stream = torch.cuda.Stream | None
"""A CUDA stream, or ``None`` for the current one (and on CPU, where there are none)."""
Figures = dict[str, float]
"""One phase's measured figures by name (only those it measured)."""

SMOLLM2_CONFIG: dict[str, Any] = {  # the converted smollm2-135m-instruct's config.json
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "unk_token_id": 0,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pretraining_tp": 1,
    "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "rope_theta": 100000.0,  # the same, for transformers before 5 (which reads only this)
    "tie_word_embeddings": True,
    "vocab_size": 49152,
}
ROWS, LENGTH = 2, 128  # the training micro-batch


def _random_smollm2(device: str, dtype: str) -> LanguageModel:
    """SmolLM2-135M with random weights, wrapped as the node wraps ``tiny-random-llama``."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 (slow import)

    torch_device, torch_dtype = resolve(device, dtype)
    with torch_device:  # initialize on the device: far faster than on one CPU thread
        model: Any = LlamaForCausalLM(LlamaConfig.from_dict(SMOLLM2_CONFIG))
    inv_freq = default_inv_freq(64, 100000.0)  # as the native loader computes it
    built = getattr(getattr(model.model, "rotary_emb", None), "inv_freq", inv_freq)
    if not torch.allclose(built.cpu(), inv_freq):  # checked before the dtype cast
        raise RuntimeError("the random model's rotary frequencies are not SmolLM2's")
    lm = from_hf("random-smollm2", model.to(torch_dtype), ByteTokenizer(), torch_device)
    lm.inv_freq = inv_freq.to(torch_device)
    return lm


def _percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class _Trainer:
    """The benchmark job's adapter and micro-batch, and a loop of staged steps; after a loop,
    ``steps`` it finished (the last, unfinished one by its share of work done), its
    ``seconds`` and the seconds it was ``busy`` in units (to its stream's synchronization)."""

    def __init__(self, lm: LanguageModel, stream: Stream) -> None:
        self.model = FrozenLlama(lm)
        self.adapter = LoraAdapter.for_model(lm, LoraConfig(rank=8), seed=1).requires_grad_()
        half = LENGTH // 2
        examples = [Example(list(range(30, 30 + half)), list(range(40, 40 + half)))] * ROWS
        self.batch = make_batch(examples, pad_id=0, device=lm.device)
        self.stream = stream
        with torch.cuda.stream(stream):  # warm, and weigh each unit by its share of a step
            warm = StagedStep(self.model, self.adapter, self.batch)
            warm.run_all()
            self._zero()
        total = sum(t.seconds for t in warm.timings)
        self.shares = [t.seconds / total for t in warm.timings]

    def _zero(self) -> None:
        for factor in self.adapter.parameters():
            factor.grad = None

    def loop(self, stop: threading.Event, duty: float) -> None:
        """Run staged steps unit by unit until ``stop``; with ``duty`` < 1 sleep after each
        unit so that units take at most ``duty`` of the time."""
        torch.set_num_threads(1)
        self.steps = self.busy = 0.0
        with torch.cuda.stream(self.stream):
            started = time.perf_counter()
            while not stop.is_set():
                step = StagedStep(self.model, self.adapter, self.batch)
                while not stop.is_set() and not step.done:
                    begun = time.perf_counter()
                    step.run_next()  # synchronizes this thread's current stream
                    spent = time.perf_counter() - begun
                    self.busy += spent
                    if duty < 1.0:
                        time.sleep(spent * (1.0 - duty) / duty)
                if step.done:
                    self._zero()
                    self.steps += 1
                else:
                    self.steps += sum(self.shares[: len(step.timings)])
            self.seconds = time.perf_counter() - started


def _decode_runner(lm: LanguageModel, running: int) -> LlamaRunner:
    runner = LlamaRunner(lm, slots=running, max_len=512)
    for slot in range(running):  # each running sequence has a 100-token context
        runner.step([], [], [Prefill(slot, list(range(10, 110)), 0, True)])
    runner.step([11] * running, [100] * running, [])  # warm
    _sync(lm.device)
    return runner


def _phase(
    runner: LlamaRunner | None,
    trainer: _Trainer | None,
    duty: float = 1.0,
    decode_stream: Stream = None,
    *,
    seconds: float,
) -> Figures:
    """Decode on this thread (on ``decode_stream``) and/or train on another, with a busy cap
    of ``duty``, for ``seconds``; the figures measured."""
    stop, thread = threading.Event(), None
    if trainer is not None:
        thread = threading.Thread(target=trainer.loop, args=(stop, duty))
        thread.start()
    steps, issues = [], []
    if runner is None:
        time.sleep(seconds)
    else:
        with torch.cuda.stream(decode_stream):
            cuda = runner.device.type == "cuda"
            wait_on = torch.cuda.current_stream(runner.device) if cuda else None
            end = time.perf_counter() + seconds
            while (started := time.perf_counter()) < end:
                runner.step([11] * runner.slots, [100] * runner.slots, [])
                issued = time.perf_counter()
                if wait_on is not None:  # this stream only, not the training thread's
                    wait_on.synchronize()
                steps.append(time.perf_counter() - started)
                issues.append(issued - started)
    stop.set()
    if thread is not None:
        thread.join()
    figures: Figures = {}
    if steps:
        figures["decode_steps"] = len(steps)
        figures["decode_p50_ms"] = _percentile(steps, 50) * 1e3
        figures["decode_p99_ms"] = _percentile(steps, 99) * 1e3
        figures["issue_p50_ms"] = _percentile(issues, 50) * 1e3
    if trainer is not None:
        figures["train_tokens_per_s"] = trainer.steps * ROWS * LENGTH / trainer.seconds
        figures["train_busy"] = trainer.busy / trainer.seconds
    return figures


def _print_table(phases: dict[str, Figures]) -> None:
    """One row per phase: decode times and their ratio to decode alone (p50 / p99), training
    tokens/s and its ratio to training alone, and the training thread's busy share."""
    base = phases["decode alone"]
    alone = phases["training alone"]["train_tokens_per_s"] or float("nan")
    rows = [
        ["phase", "decode p50", "p99", "issue p50", "x alone", "train tok/s", "x alone", "busy"]
    ]
    for name, f in phases.items():
        row = [name] + [""] * 7
        if "decode_p50_ms" in f:
            row[1:4] = [
                f"{f[k]:.2f} ms" for k in ("decode_p50_ms", "decode_p99_ms", "issue_p50_ms")
            ]
            if f is not base:
                p50, p99 = (f[k] / base[k] for k in ("decode_p50_ms", "decode_p99_ms"))
                row[4] = f"{p50:.2f} / {p99:.2f}"
        if "train_tokens_per_s" in f:
            row[5] = f"{f['train_tokens_per_s']:.0f}"
            row[6] = f"{f['train_tokens_per_s'] / alone:.2f}"
            row[7] = f"{f['train_busy']:.0%}"
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        print("  ".join([row[0].ljust(widths[0]), *cells]).rstrip())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--random-smollm2", action="store_true", help="random weights, SmolLM2's shapes")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--running", type=int, default=8, help="sequences in the decode step")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    p.add_argument("--duty", type=float, default=0.5, help="training's busy cap, throttled")
    p.add_argument("--switch-interval-ms", type=float, default=sys.getswitchinterval() * 1e3)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if not 0.0 < args.duty <= 1.0:
        p.error("--duty must be in (0, 1]")
    sys.setswitchinterval(args.switch_interval_ms / 1e3)  # the GIL's; Python's default 5 ms
    torch.set_num_threads(1)
    if args.random_smollm2:
        lm = _random_smollm2(args.device, args.dtype)
    else:
        cache = args.cache_dir or NodeSettings().model_cache_dir
        lm = load_language_model(args.model, device=args.device, dtype=args.dtype, cache_dir=cache)
    cuda = lm.device.type == "cuda"
    # The stub declares priority_range an instance method; it is static. (least, greatest):
    # a lower number is a higher priority, and 0, the default streams', is the least.
    priorities = torch.cuda.Stream.priority_range() if cuda else None  # type: ignore[call-arg]
    side = high = None
    if priorities is not None:
        side = torch.cuda.Stream(lm.device, priority=max(priorities))  # type: ignore[no-untyped-call]
        high = torch.cuda.Stream(lm.device, priority=min(priorities))  # type: ignore[no-untyped-call]
    runner = _decode_runner(lm, args.running)
    trainer = _Trainer(lm, side)
    duty, measure = args.duty, partial(_phase, seconds=args.seconds)
    phases = {
        "decode alone": measure(runner, None),
        "training alone": measure(None, trainer),
        "together": measure(runner, trainer),
        f"together, training duty {duty:g}": measure(runner, trainer, duty),
    }
    if priorities is not None and min(priorities) != max(priorities):
        phases["together, decode high priority"] = measure(runner, trainer, 1.0, high)
        phases[f"  and training duty {duty:g}"] = measure(runner, trainer, duty, high)
    setting: dict[str, object] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(lm.device) if cuda else f"cpu {platform.machine()}",
        "model": lm.name,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "running": args.running,
        "seconds": args.seconds,
        "stream_priority_range": list(priorities) if priorities is not None else None,
        "gil_switch_interval_ms": sys.getswitchinterval() * 1e3,
    }
    width = max(len(k) for k in setting)
    for key, value in setting.items():
        print(f"{key:<{width}}  {'n/a' if value is None else value}")
    print()
    _print_table(phases)
    if args.json is not None:
        figures = {**setting, "phases": phases}
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
