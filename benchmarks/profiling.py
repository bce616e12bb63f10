"""``--profile DIR``: where the time and the memory of each side go, and what a fix would give.

For the training step (NeTI and textual inversion) and the batch-1 render (stc and diffusers):
a torch.profiler operator table per side (``DIR/<what>-<side>.txt``) and the forward wall time
spent in the text encoder, the UNet, the mapper and the VAE decoder (hooks). For training also
the memory anatomy (what the text-encoder forward of each side keeps alive for the backward)
and an experiment with the fix proposed in BENCHMARKS.md: the NeTI step with the text
encoder's transformer recomputed in the backward (activation checkpointing), its peak memory
and time next to the plain step, and the text forward/backward alone with 0, 8 and 12 of its
layers checkpointed. Everything lands in ``DIR/profile.json`` too.
"""

from __future__ import annotations

import json
from pathlib import Path

from stc.train.trainer import recomputed

from .measure import ModuleTimer, Samples, alternate, peak_memory, text_transformer_stack, timed


def _table(fn, device: str, path: Path, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    text = [f"# {title}", "", "## by self time", averages.table(sort_by=sort, row_limit=30), "",
            "## by memory allocated (self)", averages.table(sort_by="self_cpu_memory_usage", row_limit=15)]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")


def _module_times(fn, modules: dict, device: str) -> dict:
    timer = ModuleTimer(modules, device)
    with timer.session() as totals:
        total = timed(fn, device)
    result = {label: round(seconds, 4) for label, seconds in totals.items()}
    result["total"] = round(total, 4)
    result["rest (backward, optimizer, glue)"] = round(total - sum(totals.values()), 4)
    return result


def _retained_by_text_forward(fn, device: str) -> int:
    """Bytes that a text-encoder forward (with gradients) leaves allocated: its output plus the
    activations saved for its backward, which live through the whole UNet forward and backward."""
    record: dict = {}
    with peak_memory(record, device):
        kept = fn()
    del kept
    return int(record.get("retained", record.get("peak", 0)))


def _caption_ids(trainer) -> list:
    """The first template's caption, tokenized by each of the trainer's tokenizers."""
    caption = [trainer.config.templates[0].format(trainer.token)]
    return [tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids for tokenizer in trainer.tokenizers]


def text_checkpoint_experiment(trainer, device: str, counts=(0, 8, 12)) -> dict:
    """The NeTI text-encoder forward and backward alone (16 rows, one caption, t = 500) with the
    first N transformer layers checkpointed: bytes kept for the backward, CPU seconds, and
    whether the mapper's gradients are bit-identical to N = 0."""
    import time
    from contextlib import ExitStack

    import torch

    layers = text_transformer_stack(trainer.text_encoder).layers
    ids = _caption_ids(trainer)
    t = torch.tensor([500])
    mapper = trainer.unwrapped_mapper
    results, reference = {}, None
    for count in dict.fromkeys(min(count, len(layers)) for count in counts):
        with ExitStack() as stack:
            stack.enter_context(recomputed(layers[:count]))
            record: dict = {}
            with peak_memory(record, device):
                kept = trainer.conditioning(ids, t, torch.Generator().manual_seed(0))
            del kept
            weights = torch.Generator().manual_seed(1)
            started = time.process_time()
            cond, _ = trainer.conditioning(ids, t, torch.Generator().manual_seed(0))
            loss = (cond.keys.float() * torch.randn(cond.keys.shape, generator=weights).to(cond.keys.device)).sum()
            loss = loss + (cond.values.float() * torch.randn(cond.values.shape, generator=weights)
                           .to(cond.values.device)).sum()
            loss.backward()
            cpu = time.process_time() - started
        grads = [p.grad.detach().clone() for p in mapper.parameters() if p.grad is not None]
        mapper.zero_grad(set_to_none=True)
        if reference is None:
            reference = grads
        results[f"{count}_of_{len(layers)}"] = {
            "kept_bytes": int(record.get("retained", record.get("peak", 0))),
            "forward_backward_cpu_seconds": round(cpu, 3),
            "mapper_grads_identical": all(torch.equal(a, b) for a, b in zip(grads, reference)),
        }
    return results


def profile_model(base, args, dtype, resolution, stock, training, bench, log) -> None:
    import torch

    folder = Path(args.profile)
    folder.mkdir(parents=True, exist_ok=True)
    device = args.device
    pipe = base.pipeline
    stack = text_transformer_stack(pipe.text_encoder)
    summary: dict = {"dtype": dtype, "resolution": resolution, "threads": torch.get_num_threads()}

    if training is not None:
        steps = training.steps
        trainer = steps["trainer"]
        modules = {"text encoder": stack, "unet": pipe.unet, "mapper": trainer.unwrapped_mapper}
        log("profile: training step")
        train: dict = {}
        for side, fn in (("neti", steps["stc"]), ("ti", steps["ti"])):
            _table(fn, device, folder / f"train-{side}.txt", f"training step, {side}, {resolution}px, {dtype}")
            train[f"{side}_forward_seconds"] = _module_times(fn, modules, device)

        ids = _caption_ids(trainer)
        t = torch.tensor([500])
        ti = steps["ti_object"] if "ti_object" in steps else None
        train["neti_text_forward_retained_bytes"] = _retained_by_text_forward(
            lambda: trainer.conditioning(ids, t, trainer.generator), device)
        if ti is not None:
            train["ti_text_forward_retained_bytes"] = _retained_by_text_forward(
                lambda: ti.encode([row.to(trainer.accelerator.device) for row in ids]), device)

        log("profile: text-encoder layer checkpointing (text forward and backward alone)")
        train["text_layer_checkpointing"] = text_checkpoint_experiment(trainer, device)
        log(f"profile: {json.dumps(train['text_layer_checkpointing'])}")

        # the proposed fix, measured: NeTI with the text encoder's transformer checkpointed
        log("profile: NeTI step with the text encoder checkpointed (the proposed fix)")

        def neti_checkpointed():
            with recomputed([stack]):
                return steps["stc"]()

        memory: dict = {}
        for label, fn in (("neti", steps["stc"]), ("neti_checkpointed", neti_checkpointed), ("ti", steps["ti"])):
            record: dict = {}
            with peak_memory(record, device):
                fn()
            memory[label] = record["peak"]
        train["peak_bytes"] = memory
        train["peak_ratio_vs_ti"] = {k: round(v / memory["ti"], 4) for k, v in memory.items()}
        repeats = max(1, args.repeats)
        plain, fixed = alternate(steps["stc"], neti_checkpointed, repeats, device, log, "neti plain/checkpointed")
        tis = Samples([timed(steps["ti"], device) for _ in range(repeats)])
        train["seconds"] = {"neti": plain.to_dict(), "neti_checkpointed": fixed.to_dict(), "ti": tis.to_dict()}
        train["time_ratio_vs_ti"] = {"neti": round(plain.median / tis.median, 4),
                                     "neti_checkpointed": round(fixed.median / tis.median, 4)}
        summary["train"] = train
        log(f"profile: peak memory vs TI {train['peak_ratio_vs_ti']}; time vs TI {train['time_ratio_vs_ti']}")

    if bench is not None:
        log("profile: render batch 1")
        modules = {"text encoder": stack, "unet": pipe.unet, "vae decoder": pipe.vae.decoder,
                   "mapper": bench.renderer.text.slots["bench"].mapper}
        render: dict = {}
        for side, fn in (("stc", bench.stc(1)), ("diffusers", bench.baseline(1))):
            _table(fn, device, folder / f"render-{side}.txt", f"render batch 1, {side}, {args.steps} steps, "
                   f"{resolution}px, {dtype}")
            render[f"{side}_forward_seconds"] = _module_times(fn, modules, device)
        pipe.unet.set_attn_processor(dict(stock))
        summary["render_bs1"] = render
        log(f"profile: render module seconds {json.dumps(render)}")

    (folder / "profile.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    log(f"profile: wrote {folder}")
