"""KV cache updated in place, and deferred logits, measured on the compiled model step.

    python benchmarks/in_place_and_logits.py [--arch llama4] [--vocab 200000] [--prefill 2048]

1. KV copies. The step is compiled as tpu-inference's runner compiles it (caches
   donated). Two measurements: in the optimised HLO, the copy ops whose result has
   a KV cache's shape (each would copy a whole cache per step); and at run time,
   whether each cache comes back in the buffer it went in with
   (`unsafe_buffer_pointer` before and after a step).
2. Deferred logits. A prefill step of `--prefill` tokens (one request) at a
   `--vocab` vocabulary: the LM head applied only to the row that is sampled (what
   the runner does: `compute_logits(hidden[logits_indices])`) vs to every token.
   Time (median, the two variants alternating) and XLA's memory estimate
   (temporaries + outputs) of each compiled step.
The model is the small checkpoint's config with the vocabulary replaced and random weights.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import fmt, machine, median, table  # noqa: E402
from model_driver import Stepper, build_model  # noqa: E402


def config_with_vocab(arch: str, vocab: int, workdir: Path) -> str:
    """The small checkpoint's config (no weights) with `vocab` tokens."""
    from jaxllm.checkpoints import cached_checkpoint

    source = cached_checkpoint(arch, "small")
    out = workdir / f"{arch}-small-vocab{vocab}"
    out.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(source / name, out / name)
    config = json.loads((out / "config.json").read_text())
    text = config.get("text_config", config)
    text["vocab_size"] = vocab
    if "vocab_size_per_layer_input" in text:
        text["vocab_size_per_layer_input"] = vocab
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def cache_copies(hlo: str, shapes) -> int:
    """Copy ops in optimised HLO whose result has one of the cache shapes."""
    count = 0
    for shape in set(shapes):
        dims = ",".join(map(str, shape))
        count += len(re.findall(rf"= f32\[{dims}\]\{{[^}}]*\}} copy(?:-start)?\(", hlo))
    return count


def kv_copies(stepper: Stepper, q_lens, context) -> list:
    compiled = stepper.compiled(False, q_lens, context)
    copies = cache_copies(compiled.as_text(), stepper.cache_shapes)
    inputs = stepper.inputs(q_lens, context)
    stepper.run(False, inputs)
    before = [c.unsafe_buffer_pointer() for c in stepper.caches]
    stepper.run(False, inputs)
    same = sum(a == c.unsafe_buffer_pointer() for a, c in zip(before, stepper.caches))
    cache_bytes = sum(c.nbytes for c in stepper.caches)
    return [copies, f"{same}/{len(before)}", fmt(cache_bytes / 2 ** 20), 0 if copies == 0 and same == len(before)
            else f">= {fmt((len(before) - same) / len(before) * cache_bytes / 2 ** 20)} MiB"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["llama4", "gemma4"])
    p.add_argument("--vocab", type=int, default=200_000)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    max_len = args.prefill + 256

    out = [f"### KV cache copies per step (compiled step, caches donated; {machine()})", ""]
    rows = []
    for arch in args.archs:
        from jaxllm.checkpoints import cached_checkpoint

        model, mesh = build_model(str(cached_checkpoint(arch, "small")), max_len)
        stepper = Stepper(model, mesh, 8, max_len)
        for label, q_lens, context in (("8 decodes", [1] * 8, 512), ("7 decodes + 128-token chunk", [1] * 7 + [128], 512)):
            rows.append([arch, label, *kv_copies(stepper, q_lens, context)])
        del model, stepper
    out.append(table(["model", "step", "cache-shaped copy ops in HLO", "caches kept their buffer",
                      "cache MiB", "KV bytes copied / step"], rows))
    print("\n".join(out), flush=True)

    out2 = [f"", f"### Deferred logits: one {args.prefill}-token prefill step, vocabulary {args.vocab:,} "
            f"(median of {args.reps}, alternating)", ""]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for arch in args.archs[:1]:
            model, mesh = build_model(config_with_vocab(arch, args.vocab, Path(workdir)), max_len)
            stepper = Stepper(model, mesh, 1, max_len)
            q_lens = [args.prefill]
            inputs = stepper.inputs(q_lens, args.prefill)
            memory = {}
            for all_logits in (False, True):
                analysis = stepper.compiled(all_logits, q_lens, args.prefill).memory_analysis()
                memory[all_logits] = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
                stepper.run(all_logits, inputs)  # compile + warm
            times = {False: [], True: []}
            for _ in range(args.reps):
                for all_logits in (False, True):
                    start = time.perf_counter()
                    stepper.run(all_logits, inputs)
                    times[all_logits].append(time.perf_counter() - start)
            hidden = model.config.hidden_size
            for all_logits in (False, True):
                rows_logits = args.prefill if all_logits else 1
                rows.append([arch, "every token" if all_logits else "sampled row only (deferred)",
                             fmt(2 * rows_logits * hidden * args.vocab / 1e9),
                             fmt(median(times[all_logits]) * 1e3), fmt(memory[all_logits] / 2 ** 20)])
            ratio_t = median(times[True]) / median(times[False])
            ratio_m = memory[True] / memory[False]
            rows.append([arch, "every token / deferred", f"{args.prefill}x", f"{ratio_t:.2f}x", f"{ratio_m:.2f}x"])
            del model, stepper
    out2.append(table(["model", "logits for", "LM head GFLOP", "step ms", "step memory MiB (XLA temp + out)"], rows))
    print("\n".join(out2))


if __name__ == "__main__":
    main()
