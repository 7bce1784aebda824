"""One FLYT step versus one plain CLIP training step of the same reference model on the same batch.

    python benchmarks/flyt.py [--world DIR] [--arch world-rn-s] [--batch 64] [--down-batch 16]
                              [--repeats 7] [--device auto] [--threads N] [--jvp backward,forward]

Plain step: forward + backward of open_clip's ClipLoss and torch.optim.AdamW (what `clipsift
train` does per step). FLYT step: scorer forward, hypergradient (∇θ L_up; ∂L_down/∂g through the
AdamW step on the downstream batch; JVP of the embeddings; d at embedding level), the scorer's
VJP and AdamW update, once per --jvp mode (how the embeddings' JVP is taken: differentiating the
upstream backward, or forward-mode AD; training/flyt/hypergrad.py). All on the world's pool images and captions; the downstream batch is
--down-batch examples from each task's training split. Ψ is random (its values do not change the
time). The steps alternate (plain, then each FLYT mode; --repeats rounds after one warm-up each);
each ratio is of medians, and the median of per-round ratios is reported beside it. Per step
kind, the share of its wall time the host spends issuing it (before the device sync): near 1 on a
GPU means kernel launches bound the step, not the GPU. bf16 autocast and CUDA syncs on
a GPU. Phase times come from separate steps with a device sync around each phase (so the timed
steps run as they would in training).
Without --world a ci world is generated in a temporary folder. Writes benchmarks/results/flyt.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clipsift import config
from clipsift.runlog import Timer
from clipsift.runtime import keep_freed_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="", help="a world folder (default: generate a ci world)")
    p.add_argument("--arch", default="world-rn-s")
    p.add_argument("--batch", type=int, default=64, help="upstream (pool) batch")
    p.add_argument("--down-batch", type=int, default=16, help="downstream examples per task")
    p.add_argument("--tasks", nargs="*", default=["shapes", "colour_shape", "count"], help="downstream tasks")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--jvp", default="backward,forward", help="comma-separated JVP modes to time (hypergrad.JVP_MODES)")
    p.add_argument("--profile", default="", metavar="FILE",
                   help="also write torch.profiler's table of three FLYT steps (ops by self time, the first --jvp mode) "
                        "to FILE; under the profiler forward-mode steps keep their inputs alive, so profile few")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "flyt.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    keep_freed_memory()  # as the CLI does
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(args.world) if args.world else _ci_world(Path(tmp) / "world")
        results = bench(world, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def _ci_world(out: Path) -> Path:
    from clipsift.world.config import WorldConfig
    from clipsift.world.generate import generate_world

    return generate_world(config.load(WorldConfig, config.preset_path("world", "ci"), [f"out={out}"]), progress=False)


def bench(world: Path, args) -> dict:
    from open_clip import ClipLoss

    from clipsift.eval.models import load_model
    from clipsift.eval.tasks import load_tasks
    from clipsift.training.data import MemoryData, find_shards, normalize
    from clipsift.training.flyt import data as fdata
    from clipsift.training.flyt.adamw import AdamWHyper, AdamWState, decayed_names
    from clipsift.training.flyt.hypergrad import JVP_MODES, FunctionalCLIP, hypergradient_step, scorer_backward
    from clipsift.training.flyt.scorer import GLUScorer
    from clipsift.training.models import param_groups

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    torch.manual_seed(0)
    ref = load_model(args.arch, "", device)
    model = ref.model.eval()  # FLYT's mode (BatchNorm statistics frozen); the plain step uses the same
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    pool = MemoryData(find_shards(world / "pool" / "shards")[:1], size, args.arch, None, args.batch, 0)
    idx = torch.from_numpy(pool.order.indices(0))
    mean = torch.tensor(model.visual.preprocess_cfg["mean"], device=device)
    std = torch.tensor(model.visual.preprocess_cfg["std"], device=device)
    images = normalize(pool.images[idx].to(device), mean, std)
    tokens = pool.tokens[idx].long().to(device)
    tasks = [t for t in load_tasks(world / "tasks.yaml") if t.name in args.tasks]
    down = fdata.DownstreamBatches([fdata.load_task(t, "train", ref.preprocess, ref.tokenizer) for t in tasks],
                                   args.down_batch, 0, used_prompts_only=True)  # as training with the default clip loss
    dbatch = down.batch(0).to(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    host: dict[str, list[float]] = {}  # per step kind: the host's share of the step (see below)

    def once(fn, kind: str) -> float:
        """The step's wall time, from an idle device to its last kernel's end. Also records how long
        the host took to issue it: where that is nearly all of the step (a share near 1 on a GPU),
        kernel launches, not the GPU, bound the step."""
        sync()
        t0 = time.perf_counter()
        fn()
        issued = time.perf_counter()
        sync()
        total = time.perf_counter() - t0
        host.setdefault(kind, []).append((issued - t0) / total)
        return total

    # Plain CLIP step.
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=5e-5, betas=(0.9, 0.98), eps=1e-6, fused=True)  # as train
    loss_fn = ClipLoss()

    def plain() -> None:
        with amp():
            u, t, s = model(images, tokens)[:3]
            loss = loss_fn(u, t, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # FLYT step.
    fmodel = FunctionalCLIP(model)
    params = fmodel.params()
    state = AdamWState.zeros_like(params)
    decay = decayed_names(params)
    dim = 2 * int(model.text_projection.shape[1])
    psi = fdata.psi(torch.randn(args.batch, dim // 2), torch.randn(args.batch, dim // 2)).to(device)
    scorer = GLUScorer(dim).to(device)
    rho = torch.nn.Parameter(torch.tensor(2.6593, device=device))
    sopt = torch.optim.AdamW(list(scorer.parameters()) + [rho], lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    holder = {"params": params, "state": state}
    modes = [m for m in args.jvp.split(",") if m]
    if not modes or any(m not in JVP_MODES for m in modes):
        raise SystemExit(f"--jvp: comma-separated modes out of {JVP_MODES}, got {args.jvp!r}")

    def flyt(phases=None, mode: str = modes[0]) -> None:
        phase = phases or (lambda _name: contextlib.nullcontext())
        with phase("scorer"):
            scores = scorer(psi)
            w = torch.softmax(scores.detach().float(), 0)
        res = hypergradient_step(fmodel, holder["params"], holder["state"], AdamWHyper(5e-5), decay, images, tokens,
                                 w, lambda p: fdata.downstream_loss(lambda x, t: fmodel(p, x, t), dbatch, rho),
                                 [rho], None, amp=amp, timer=phases, jvp_mode=mode)
        with phase("scorer"):
            sopt.zero_grad(set_to_none=True)
            scorer_backward(scores, res.d)
            rho.grad = res.extra_grads[0]
            sopt.step()
        with phase("release"):  # θ and the old moments are freed here
            holder["params"], holder["state"] = res.params, res.state
            del res

    plain()
    for mode in modes:  # warm-up
        flyt(mode=mode)
    plain_s, flyt_s = [], {m: [] for m in modes}
    for _ in range(args.repeats):  # interleaved, so a machine whose load drifts slows all alike
        plain_s.append(once(plain, "plain"))
        for mode in modes:
            flyt_s[mode].append(once(lambda: flyt(mode=mode), mode))

    @contextlib.contextmanager
    def synced(timer: Timer, name: str):
        sync()
        with timer(name):
            yield
            sync()

    phase_steps = 3
    per_phase = {}
    for mode in modes:
        phases = Timer()
        for _ in range(phase_steps):
            flyt(lambda name: synced(phases, name), mode)
        per_phase[mode] = {k: round(v / phase_steps, 4) for k, v in phases.as_dict().items()}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []), record_shapes=True) as prof:
            for _ in range(phase_steps):
                flyt(mode=modes[0])
            sync()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        Path(args.profile).write_text(prof.key_averages().table(sort_by=key, row_limit=40) + "\n" + prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=40) + "\n")
        print(f"wrote {args.profile}")
    med_plain = statistics.median(plain_s)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    by_mode = {m: {"flyt_step_s": flyt_s[m], "median_flyt_step_s": round(statistics.median(flyt_s[m]), 4),
                   "ratio_flyt_over_plain": round(statistics.median(flyt_s[m]) / med_plain, 3),
                   "median_pairwise_ratio": round(statistics.median(f / q for f, q in zip(flyt_s[m], plain_s)), 3),
                   "host_issue_share": round(statistics.median(host[m]), 3),
                   "flyt_phase_mean_s": per_phase[m]}  # from separate steps with a sync around each phase
               for m in modes}
    result = {
        "machine": {"device": str(device), "gpu": torch.cuda.get_device_name() if cuda else None,
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1min": load,
                    "python": platform.python_version(), "torch": torch.__version__},
        "setup": {"arch": args.arch, "upstream_batch": args.batch, "downstream_per_task": args.down_batch,
                  "tasks": [t.name for t in tasks], "downstream_images": int(dbatch.images.shape[0]),
                  "downstream_texts": int(dbatch.tokens.shape[0]), "precision": "bf16" if cuda else "fp32",
                  "repeats": args.repeats},
        "plain_step_s": plain_s, "median_plain_step_s": round(med_plain, 4),
        "plain_host_issue_share": round(statistics.median(host["plain"]), 3), "jvp": by_mode,
    }
    print(f"{args.arch} on {device}: upstream batch {args.batch}, downstream {dbatch.images.shape[0]} images + "
          f"{dbatch.tokens.shape[0]} texts ({len(tasks)} tasks)")
    print(f"  plain CLIP step         median {med_plain:8.4f} s   host issues {result['plain_host_issue_share']:.0%} of it")
    for m, r in by_mode.items():
        print(f"  FLYT step, jvp {m:8s} median {r['median_flyt_step_s']:8.4f} s   ratio {r['ratio_flyt_over_plain']:.2f}x "
              f"(median of per-round ratios {r['median_pairwise_ratio']:.2f}x); host issues {r['host_issue_share']:.0%} of it")
        print("    phases (mean s): " + ", ".join(f"{k} {v}" for k, v in r["flyt_phase_mean_s"].items()))
    if cuda:
        print("  (host issuing ~100% of a step: kernel launches bound it, the GPU waits; well below: the GPU bounds it)")
    if load is not None:
        print(f"  1-min load average {load:.1f} on {os.cpu_count()} cores (other work shares them: compare the ratio)")
    return result


if __name__ == "__main__":
    main()
