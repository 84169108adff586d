"""`compkern coind toy|train|eval|sample`: CoInD on the 2-D positive control and on colored digits.

    compkern coind toy                                   # appendix E.1 closed-form control, seconds
    compkern coind train --out runs/coind/partial_coind_s0 --support partial --lam 1 --steps 8000
    compkern coind eval runs/coind/partial_coind_s0 runs/coind/partial_vanilla_s0 --weights 1 2 3
    compkern coind sample runs/coind/partial_coind_s0 --digit 3 --color 0 --weight 2 --png /tmp/s.png

Training is resumable (rerun the same command); eval writes eval.json into each run folder.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from compkern.data.digits import ColoredDigits, full_support
from compkern.experiments._args import (add_batch_size, add_progress, add_sample_steps, add_seed, add_threads,
                                        add_train_steps)
from compkern.models.attribute_unet import AttributeMLP
from compkern.train.coind import (CoInDTrainer, build_digits_model, coind_schedule, compose_sample, conformity_score,
                                  implicit_jsd, load_or_train_classifier, load_run)
from compkern.utils.checkpoint import load
from compkern.utils.run_folder import RunFolder


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_threads(common)

    t = sub.add_parser("toy", parents=[common], help="2-D positive control: vanilla vs CoInD on the unseen mode")
    add_train_steps(t, 3000, dest="steps")
    t.add_argument("--lam", type=float, nargs="+", default=[0.0, 1.0])
    t.add_argument("--sigma", type=float, default=0.1)
    t.add_argument("--n", type=int, default=2000, help="samples of the unseen combination")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--weights", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    add_batch_size(t, 512, dest="batch")
    t.add_argument("--masking", choices=["independent", "joint"], default="independent")
    t.add_argument("--out", default="runs/coind/toy")

    tr = sub.add_parser("train", parents=[common], help="train on colored digits (resumable)")
    tr.add_argument("--out", required=True)
    tr.add_argument("--support", choices=["full", "partial"], default="partial")
    tr.add_argument("--lam", type=float, default=1.0)
    add_train_steps(tr, 8000, dest="steps")
    add_batch_size(tr, 64, dest="batch")
    tr.add_argument("--ci-batch", type=int, default=16)
    tr.add_argument("--p-drop", type=float, default=0.2)
    tr.add_argument("--masking", choices=["independent", "joint"], default="independent")
    tr.add_argument("--lr", type=float, default=5e-4)
    tr.add_argument("--size", type=int, choices=[8, 16], default=8)
    tr.add_argument("--digits", type=int, default=5)
    tr.add_argument("--colors", type=int, default=5)
    tr.add_argument("--channels", type=int, nargs="+", default=[32, 64])
    tr.add_argument("--no-attention", action="store_true")
    add_seed(tr)
    tr.add_argument("--save-every", type=int, default=500)
    add_progress(tr)

    ev = sub.add_parser("eval", parents=[common], help="JSD and conformity score of trained runs")
    ev.add_argument("runs", nargs="+")
    ev.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    ev.add_argument("--n-per", type=int, default=20, help="samples per (digit, color) combination")
    ev.add_argument("--jsd-per", type=int, default=5, help="real test images per combination for JSD")
    add_sample_steps(ev, 50, "DDIM sampling steps", dest="ddim_steps", old=("--ddim-steps",))
    ev.add_argument("--joint", action="store_true", help="also sample with joint (digit, color) guidance")
    ev.add_argument("--seed", type=int, default=1234)
    ev.add_argument("--classifier", default="runs/coind/classifier_s{size}.pt")

    sa = sub.add_parser("sample", parents=[common], help="sample one combination to a PNG")
    sa.add_argument("run")
    sa.add_argument("--digit", type=int, required=True)
    sa.add_argument("--color", type=int, required=True)
    sa.add_argument("--weight", type=float, default=2.0)
    sa.add_argument("--n", type=int, default=16)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--png", default="coind_samples.png")


# ----------------------------------------------------------------------------------------------
def run_toy(args) -> dict:
    """Appendix E.1 (the reference notebook's layout): z in {0,1}^2, x = (2 z - 1) + sigma N(0, I), i.e.
    modes at (+-1, +-1); train on the three combinations other than z = (1, 1); sample (1, 1)
    compositionally, eps(null) + w (eps(z1=1) - eps(null)) + w (eps(z2=1) - eps(null)), and count
    samples within 3 sigma of (1, 1)."""
    seen = torch.tensor([[0, 0], [0, 1], [1, 0]])
    target = torch.tensor([1.0, 1.0])
    sched = coind_schedule()
    rows = []
    for seed in args.seeds:
        for lam in args.lam:
            torch.manual_seed(seed)
            model = AttributeMLP([2, 2], dim=2, hidden=128, depth=3)

            def data_fn(b, g):
                z = seen[torch.randint(0, 3, (b,), generator=g)]
                return (2 * z - 1).float() + args.sigma * torch.randn(b, 2, generator=g), z

            out = Path(args.out) / f"lam{lam:g}_s{seed}"
            tr = CoInDTrainer(model, sched, data_fn, model.null, out, lam=lam, p_drop=0.2, masking=args.masking,
                              batch=args.batch, ci_batch=args.batch // 4, lr=1e-3, ema=0.0, seed=seed,
                              save_every=args.steps, log_every=100,
                              config={"kind": "toy", "sigma": args.sigma}, progress=False)
            t0 = time.process_time()
            tr.fit(args.steps)
            train_s = time.process_time() - t0
            hist = tr.trainer.history[-1]
            for w in args.weights:
                q = torch.ones(args.n, 2, dtype=torch.long)
                x = compose_sample(model, sched, q, model.null, w, (2,), num_steps=100,
                                   generator=torch.Generator().manual_seed(seed), clip_x0=None)
                frac = float(((x - target).norm(dim=1) < 3 * args.sigma).float().mean())
                rows.append({"seed": seed, "lam": lam, "w": w, "frac_unseen_mode": frac, "mean_x": x.mean(0).tolist(),
                             "train_cpu_s": round(train_s, 1), "ci_last": hist.get("ci")})
                print(f"seed {seed} lam {lam:g} w {w:g}: fraction within 3 sigma of (1,1) = {frac:.3f}, "
                      f"mean sample {[round(v, 2) for v in x.mean(0).tolist()]}, ci {hist.get('ci'):.3g}, "
                      f"train {train_s:.1f} CPU-s", flush=True)
    summary = {}
    for lam in args.lam:
        for w in args.weights:
            f = torch.tensor([r["frac_unseen_mode"] for r in rows if r["lam"] == lam and r["w"] == w])
            summary[f"lam{lam:g}_w{w:g}"] = {"mean": float(f.mean()), "min": float(f.min()), "max": float(f.max())}
            print(f"lam {lam:g} w {w:g}: fraction in the unseen mode {float(f.mean()):.3f} "
                  f"(min {float(f.min()):.3f}, max {float(f.max()):.3f}) over seeds {args.seeds}")
    RunFolder(args.out).write_json("toy.json", {"rows": rows, "summary": summary})
    return summary


# ----------------------------------------------------------------------------------------------
def run_train(args) -> None:
    cfg = {"kind": "digits", "support": args.support, "size": args.size, "digits": args.digits, "colors": args.colors,
           "channels": list(args.channels), "attention": not args.no_attention}
    torch.manual_seed(args.seed)
    model = build_digits_model(cfg)
    data = ColoredDigits(size=args.size, n_digits=args.digits, n_colors=args.colors, support=args.support, split="train")
    tr = CoInDTrainer(model, coind_schedule(), data.sample, model.null, args.out, lam=args.lam, p_drop=args.p_drop,
                      masking=args.masking, batch=args.batch, ci_batch=args.ci_batch, lr=args.lr, seed=args.seed,
                      save_every=args.save_every, config=cfg, progress=not args.no_progress)
    t0 = time.process_time()
    start = tr.step
    tr.fit(args.steps)
    el = time.process_time() - t0
    if tr.step > start:
        print(f"trained steps {start}..{tr.step} in {el:.0f} CPU-s ({1000 * el / (tr.step - start):.1f} ms/step); "
              f"last log {tr.trainer.history[-1]}")


@torch.no_grad()
def run_eval(args) -> list[dict]:
    results = []
    sched = coind_schedule()
    for run in args.runs:
        model, cfg = load_run(run)
        clf, clf_acc = load_or_train_classifier(args.classifier, cfg)
        part = ColoredDigits(size=cfg["size"], n_digits=cfg["digits"], n_colors=cfg["colors"], support=cfg["support"])
        # the evaluation split is always the partial rule's: "unseen" = held out from partial-support training
        ref = ColoredDigits(size=cfg["size"], n_digits=cfg["digits"], n_colors=cfg["colors"], support="partial", split="test")
        unseen_mask = ~ref.support
        combos = full_support(cfg["digits"], cfg["colors"]).nonzero()
        is_unseen = unseen_mask[combos[:, 0], combos[:, 1]]
        g = torch.Generator().manual_seed(args.seed)
        # JSD on real held-out images, per group
        jsd_res = {}
        for name, sel in (("unseen", is_unseen), ("seen", ~is_unseen)):
            lab = combos[sel].repeat_interleave(args.jsd_per, 0)
            x = ref.render(lab, g)
            jsd_res[name] = implicit_jsd(model, sched, x, lab, part.n_values, model.null, generator=g)
        query = combos.repeat_interleave(args.n_per, 0)
        unseen_q = unseen_mask[query[:, 0], query[:, 1]]
        shape = (3, cfg["size"], cfg["size"])
        sweep = []
        modes = ["compose"] + (["joint"] if args.joint else [])
        for mode in modes:
            for w in args.weights:
                t0 = time.process_time()
                x = compose_sample(model, sched, query, model.null, w, shape, mode=mode, num_steps=args.ddim_steps,
                                   generator=torch.Generator().manual_seed(args.seed))
                cs_u, acc_u = conformity_score(clf, x[unseen_q], query[unseen_q])
                cs_s, acc_s = conformity_score(clf, x[~unseen_q], query[~unseen_q])
                row = {"mode": mode, "w": w, "cs_unseen": cs_u, "acc_unseen": acc_u, "cs_seen": cs_s, "acc_seen": acc_s,
                       "sample_cpu_s": round(time.process_time() - t0, 1)}
                sweep.append(row)
                print(f"{run} {mode} w={w:g}: CS unseen {cs_u:.3f} (digit {acc_u[0]:.2f}, color {acc_u[1]:.2f}) "
                      f"| CS seen {cs_s:.3f} (digit {acc_s[0]:.2f}, color {acc_s[1]:.2f})")
        best = max((r for r in sweep if r["mode"] == "compose"), key=lambda r: r["cs_unseen"])
        ck = load(Path(run) / "checkpoint.pt")
        res = {"run": str(run), "config": cfg, "step": ck["step"], "last_log": ck["history"][-1] if ck["history"] else None,
               "jsd": jsd_res, "sweep": sweep, "best": best, "classifier_test": clf_acc,
               "n_per": args.n_per, "eval_seed": args.seed}
        RunFolder(run).write_json("eval.json", res)
        print(f"{run}: JSD unseen {jsd_res['unseen']['jsd']:.3f} (symKL {jsd_res['unseen']['symmetrized_kl']:.3f}), "
              f"JSD seen {jsd_res['seen']['jsd']:.3f}; best w={best['w']:g}: CS unseen {best['cs_unseen']:.3f}, "
              f"CS seen {best['cs_seen']:.3f}; classifier test CS {clf_acc['cs']:.3f}")
        results.append(res)
    return results


@torch.no_grad()
def run_sample(args) -> None:
    model, cfg = load_run(args.run)
    q = torch.tensor([[args.digit, args.color]]).repeat(args.n, 1)
    x = compose_sample(model, coind_schedule(), q, model.null, args.weight, (3, cfg["size"], cfg["size"]),
                       generator=torch.Generator().manual_seed(args.seed))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = args.n
    fig, axes = plt.subplots(1, n, figsize=(n, 1.2))
    for i, ax in enumerate(axes if n > 1 else [axes]):
        ax.imshow(((x[i] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.axis("off")
    fig.savefig(args.png, dpi=80, bbox_inches="tight")
    print(f"wrote {args.png}")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    {"toy": run_toy, "train": run_train, "eval": run_eval, "sample": run_sample}[args.action](args)
    return 0
