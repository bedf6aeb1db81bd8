"""The training recipe: setup -> train -> save_checkpoint -> cleanup.

    trainer = Trainer(TrainConfig(student_model="adapter/", dataset="data.jsonl", output_dir="out", ...))
    trainer.setup(); trainer.train(); trainer.cleanup()

One optimizer step = `gradient_accumulation_steps` micro-batches of `batch_size` sequences on each of
W ranks. The loss of a step is a mean over all its target tokens on all ranks:

    loss = ce_weight × CE + kl_weight × T² × KL(teacher ‖ student)_T + router_kl_weight × router KL
           + replay_weight × T² × KL(teacher ‖ student)_T on --replay-dataset   (its own token mean)

Each micro-batch contributes its token *sums* divided by the step's global token count (known
before the first forward), times W because DDP averages gradients over ranks; so W ranks with
accumulation A compute the same gradient as one process with accumulation W × A.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import dist
from ..adapter import load_adapter_weights
from ..data import check_seq_len, load_tokenizer
from ..defaults import seq_len_for
from ..device import resolve_device
from ..errors import NexusError
from ..forward import (RouterCapture, StudentBackbone, check_head_split, default_chunk_size, lm_head_of, router_params,
                       swapped_weights, vocab_size)
from ..fsutil import write_json
from ..moe import find_moe_blocks
from ..shared import format_parameter_summary, shared_experts_disabled
from ..sharding import average_replicated_grads, gather_full, gather_optimizer_state, like, optimizer_state_like
from ..stream import SequenceStream, StepLayout, build_sequences, trim_padding
from ..version import __version__
from . import checkpoint as ckpt
from .build import data_spec, load_data, load_student, make_teacher
from .config import TrainConfig
from .metrics import MetricsLog, Thresholds
from .optim import TrainableParams, build_optimizer, set_lr
from .selection import BEST, GeneralSelection
from .step import STATS, batch_loss, metrics_row

log = logging.getLogger("nexus.train")
RUN_CONFIG = "run_config.json"


def holds_run(output_dir: str | Path) -> bool:
    """Whether `output_dir` holds (part of) a training run: its config, metrics, a checkpoint or final/."""
    out = Path(output_dir)
    return out.is_dir() and (any((out / n).exists() for n in (RUN_CONFIG, "metrics.jsonl", "final", BEST))
                             or bool(ckpt.checkpoints(out)))


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.check()
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.step = 0

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        dist.init(resolve_device(cfg.device))
        self.device = resolve_device(cfg.device)  # under torchrun: this rank's GPU
        self.rank, self.world = dist.rank(), dist.world_size()
        torch.manual_seed(cfg.seed)
        resume = self._resume_point()

        self.tokenizer = load_tokenizer(cfg.student_model, what="--student-model")
        self.model, original_routers, self.root = load_student(cfg, self.device)
        if cfg.seq_len is None:  # the teacher cache's (it must match), else fitted to the model
            from ..teacher.cache import TeacherCache

            cfg.seq_len = TeacherCache(cfg.precomputed_teacher).seq_len if cfg.precomputed_teacher else \
                seq_len_for(self.model, None)
        check_seq_len(self.model, cfg.seq_len, "student model")
        check_head_split(self.model, self.device, self.root)
        self.blocks = find_moe_blocks(self.model)
        self.routers = router_params(self.blocks)
        self.capture = RouterCapture(self.model, self.blocks)
        self.teacher = make_teacher(cfg, self.model, original_routers, self.capture, self.tokenizer, self.device,
                                    self.root)
        self.spec, self.seqs = load_data(cfg, self.tokenizer)
        self.stream = SequenceStream(self.seqs, cfg.seed)
        self.layout = StepLayout(cfg.batch_size, cfg.gradient_accumulation_steps, self.world)
        self.eval_seqs = build_sequences(data_spec(cfg, cfg.eval_dataset), self.tokenizer, "--eval-dataset") \
            if cfg.eval_dataset else None
        self.general_seqs = build_sequences(data_spec(cfg, cfg.general_eval_dataset), self.tokenizer,
                                            "--general-eval-dataset") if cfg.general_eval_dataset else None
        self.original_routers, self.selection, self.resumed_selection = original_routers, None, None
        self.replay = None
        if cfg.replay_dataset:
            seqs = build_sequences(data_spec(cfg, cfg.replay_dataset), self.tokenizer, "--replay-dataset")
            # its own order (seed + 1) and positions: step s reads the same sequences on any number of ranks
            self.replay = (seqs, SequenceStream(seqs, cfg.seed + 1),
                           StepLayout(cfg.batch_size, cfg.replay_batches, self.world))
        if not self.teacher.online and self.layout.global_batch * cfg.max_steps > len(self.teacher.cache):
            raise NexusError(f"--precomputed-teacher holds {len(self.teacher.cache)} sequences; --max-steps "
                             f"{cfg.max_steps} × global batch {self.layout.global_batch} needs "
                             f"{cfg.max_steps * self.layout.global_batch}")

        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        # the dtype each trainable weight has in the adapter: a sharded run keeps routers in fp32 (FSDP2 casts)
        self.stored_dtypes = {n: p.dtype for n, p in named.items()}
        for b in self.blocks:
            for pname, _ in b.router.named_parameters():
                dtype = getattr(b.router, "nexus_param_dtype", None)
                if dtype is not None and f"{b.path}.{b.router_name}.{pname}" in named:
                    self.stored_dtypes[f"{b.path}.{b.router_name}.{pname}"] = dtype
        self.params = TrainableParams(named)
        self.optimizer = build_optimizer(self.params, cfg.learning_rate, cfg.weight_decay, cfg.down_lr_ratio)
        self.schedule = cfg.schedule()
        self.head = lm_head_of(self.model)
        self.chunk = cfg.kl_chunk_size or default_chunk_size(vocab_size(self.model))
        self.anchor = self.params.values() if cfg.sfa_interval else None
        if cfg.gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        if resume is not None:
            self._load_checkpoint(resume)
        if not self.teacher.online:  # open (and checksum) the first cache shard this run reads before writing
            self.teacher.batch(self.layout.positions(self.step, 0, self.rank))
        self.router_frozen = False
        self._apply_router_freeze()
        self._wrap()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if resume is None:
                write_json(self.out / RUN_CONFIG, self._run_config())
        self.metrics = MetricsLog(self.out, cfg.max_steps, cfg.logging_steps,
                                  Thresholds(cfg.kl_warn_threshold, cfg.grad_spike_threshold,
                                             cfg.router_l1_warn_threshold), enabled=self.rank == 0,
                                  resume_step=self.step)
        if self.rank == 0:
            log.info(format_parameter_summary(self.model))
            log.info(f"data: {len(self.seqs)} sequences of {cfg.seq_len} tokens; global batch "
                     f"{self.layout.global_batch} sequences ({self.world} rank(s) × {cfg.batch_size} × "
                     f"{cfg.gradient_accumulation_steps}); {cfg.max_steps} steps = "
                     f"{cfg.max_steps * self.layout.global_batch / len(self.seqs):.2f} epochs; teacher: "
                     f"{type(self.teacher).__name__}")
            if self.replay is not None:
                seqs, _, layout = self.replay
                log.info(f"replay: {len(seqs)} sequences of --replay-dataset, {layout.global_batch} per step "
                         f"({cfg.max_steps * layout.global_batch / len(seqs):.2f} epochs), KL weight "
                         f"{cfg.replay_weight:g}")
        if self.general_seqs is not None:
            self._start_selection()

    def _resume_point(self) -> Path | None:
        cfg = self.cfg
        if self.out.exists() and not self.out.is_dir():
            raise NexusError(f"--output-dir {self.out}: exists and is not a directory")
        if cfg.resume_from_checkpoint:
            path = ckpt.resolve_resume(cfg.resume_from_checkpoint, self.out)
            if path is None and self.rank == 0:
                log.info(f"no checkpoint in {self.out} yet: starting from step 0")
            return path
        if holds_run(self.out):
            raise NexusError(f"--output-dir {self.out} holds another run; pass --resume-from-checkpoint latest "
                             f"to continue it, or choose another --output-dir")
        return None

    def _run_config(self) -> dict:
        return {"format": "nexus-train-run", "version": 1, "nexus_version": __version__, "config": self.cfg.to_dict(),
                "world_size": self.world, "global_batch": self.layout.global_batch, "data": self.spec.describe(),
                "data_fingerprint": self.seqs.fingerprint(), "schedule": vars(self.schedule).copy(),
                "router_freeze_step": self.cfg.router_freeze_step, "trainable_parameters": self.params.numel()}

    def _apply_router_freeze(self) -> bool:
        """Freeze the routers once `router_freeze_step` steps are done (also right after a resume).

        Returns True when this call froze them. The optimizer keeps their state; with no gradient
        AdamW leaves them untouched, and a checkpoint records the freeze.
        """
        freeze_at = self.cfg.router_freeze_step
        if freeze_at is None or self.router_frozen or self.step < freeze_at:
            return False
        for p in self.routers.values():
            p.requires_grad_(False)
            p.grad = None
        self.router_frozen = True
        if self.rank == 0 and self.step > 0:
            log.info(f"step {self.step}: router frozen (--bias-freeze-ratio)")
        return True

    def _wrap(self) -> None:
        """(Re)build the DDP wrapper over the parameters that currently require grad (--shard-base: the FSDP2 root)."""
        if self.root is not None:
            self.student = self.root
            return
        self.student = None
        gc.collect()  # a replaced DDP wrapper must release its gradient hooks before the next backward
        self.student = StudentBackbone(self.model)
        if self.world > 1:
            # The frozen base and its buffers are loaded identically on every rank: DDP's start-up broadcast
            # of the whole module (init_sync) and its per-forward buffer broadcast would copy gigabytes for
            # nothing. Only the trainable weights are made equal to rank 0's, then DDP reduces their gradients.
            for p in self.student.parameters():
                if p.requires_grad:
                    torch.distributed.broadcast(p.data, src=0)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.student = DDP(self.student, device_ids=ids, init_sync=False, broadcast_buffers=False)

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> None:
        while self.step < self.cfg.max_steps:
            self.train_step()
        self.save_checkpoint(kind="final")
        if self.selection is not None and self.rank == 0:
            self.selection.summary()

    def train_step(self) -> dict:
        """One optimizer step with its bookkeeping (freeze, SFA, eval, metrics, checkpoint); returns its row."""
        cfg = self.cfg
        t0 = time.perf_counter()
        row = self._optimizer_step(self.step)
        self.step += 1
        if self._apply_router_freeze():
            self._wrap()  # DDP over the parameters that still train
        if cfg.sfa_interval and self.step % cfg.sfa_interval == 0:
            self.params.sfa_blend(self.anchor, cfg.sfa_alpha)
        row["tokens_per_s"] = row.pop("_tokens") / max(time.perf_counter() - t0, 1e-9)
        if self.eval_seqs is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                           or self.step == cfg.max_steps):
            row.update(self.evaluate())
        self.metrics.write(row)
        if "eval_general_change" in row:
            self._select(row)
        if self.step % cfg.checkpoint_interval == 0 and self.step < cfg.max_steps:
            self.save_checkpoint()
        return row

    def _micro_batches(self, step: int) -> list[dict]:
        """This rank's micro-batches of `step`; with a cache, its ids checked against our own pipeline."""
        out = []
        for m in range(self.cfg.gradient_accumulation_steps):
            positions = self.layout.positions(step, m, self.rank)
            ids, mask = self.stream.batch(positions)
            cached = None
            if not self.teacher.online:
                cached = self.teacher.batch(positions)
                if not (torch.equal(cached["input_ids"], ids) and torch.equal(cached["attention_mask"], mask)):
                    raise NexusError(f"--precomputed-teacher: the cached input ids at stream positions "
                                     f"{positions.start}..{positions.stop - 1} differ from what this run's data "
                                     f"pipeline produces (different --dataset, --seed or data order)")
                length = int(mask.sum(1).max())
                cached = {k: v[:, :length] for k, v in cached.items()}
            ids, mask = trim_padding(ids, mask)
            out.append({"ids": ids.to(self.device), "mask": mask.to(self.device), "cached": cached,
                        "positions": positions})
        return out

    def _replay_batches(self, step: int) -> list[dict]:
        """This rank's --replay-dataset micro-batches of `step` (none without replay)."""
        if self.replay is None:
            return []
        _, stream, layout = self.replay
        out = []
        for m in range(layout.accumulation):
            positions = layout.positions(step, m, self.rank)
            ids, mask = trim_padding(*stream.batch(positions))
            out.append({"ids": ids.to(self.device), "mask": mask.to(self.device), "cached": None,
                        "positions": positions})
        return out

    def _optimizer_step(self, step: int) -> dict:
        cfg, sched = self.cfg, self.schedule.at(step)
        temperature, kl_w = sched["temperature"], sched["kl_weight"]
        batches = self._micro_batches(step)
        # The step's global token counts, before any forward: every micro-batch divides by them.
        counts = sum(torch.stack([(b["mask"][:, :-1] * b["mask"][:, 1:]).sum(), b["mask"].sum()]).double()
                     for b in batches)
        n_targets, n_tokens = dist.all_reduce_sum(counts).tolist()
        use_teacher = kl_w > 0 or cfg.router_kl_weight > 0
        weights = {"ce": cfg.ce_weight * self.world / n_targets,
                   "kl": kl_w * temperature ** 2 * self.world / n_targets}
        router_w = cfg.router_kl_weight * self.world / (n_tokens * len(self.blocks))
        replay = self._replay_batches(step)
        if replay:  # the replayed text: only the KL to the teacher, a mean over its own target tokens
            n_replay = dist.all_reduce_sum(sum((b["mask"][:, :-1] * b["mask"][:, 1:]).sum() for b in replay)
                                           .double()).item()
            replay_w = {"ce": 0.0, "kl": cfg.replay_weight * temperature ** 2 * self.world / n_replay}
        sums = torch.zeros(len(STATS), dtype=torch.float64, device=self.device)
        replay_sums = torch.zeros(len(STATS), dtype=torch.float64, device=self.device)
        work = [(b, False) for b in batches] + [(b, True) for b in replay]
        for m, (b, replayed) in enumerate(work):
            sync = m == len(work) - 1 or not isinstance(self.student, DDP)
            with contextlib.nullcontext() if sync else self.student.no_sync():
                loss, stats = batch_loss(self.student, self.head, self.capture, self.teacher, b["ids"], b["mask"],
                                         replay_w if replayed else weights, 0.0 if replayed else router_w,
                                         temperature, self.chunk, replayed or use_teacher, b["positions"],
                                         b["cached"])
                loss.backward()
            if replayed:
                replay_sums += stats
            else:
                sums += stats
        if self.router_frozen:  # a sharded run still reduces their gradients; frozen means not applied
            for p in self.routers.values():
                p.grad = None
        if self.root is not None:
            average_replicated_grads(self.params.params)
        sums = dict(zip(STATS, dist.all_reduce_sum(sums).tolist()))
        row = {"step": step + 1, **metrics_row(sums, len(self.blocks), temperature, cfg.ce_weight, kl_w,
                                               cfg.router_kl_weight, self._router_kind() if use_teacher else None)}
        row["replay_kl"] = None
        if replay:
            r = dict(zip(STATS, dist.all_reduce_sum(replay_sums).tolist()))
            row["replay_kl"] = temperature ** 2 * r["kl"] / r["targets"]
            row["loss"] += cfg.replay_weight * row["replay_kl"]
        self.params.grads_to_masters()
        grad_norm = float(self.params.grad_norm_and_clip(cfg.gradient_clip_val))
        if not (math.isfinite(row["loss"]) and math.isfinite(grad_norm)):
            last = ckpt.checkpoints(self.out)
            raise NexusError(f"step {step + 1}: loss is {row['loss']} (grad norm {grad_norm}); stopped before the "
                             f"update. Last good checkpoint: {last[-1][1] if last else 'none'}. Lower "
                             f"--learning-rate or check the data, then resume from that checkpoint")
        set_lr(self.optimizer, sched["lr"])
        self.optimizer.step()
        self.params.masters_to_model()
        self.params.zero_grad()
        row.update(lr=sched["lr"], temperature=temperature, kl_weight=kl_w, grad_norm=grad_norm, _tokens=n_tokens)
        return row

    def _router_kind(self) -> str | None:
        if not self.teacher.provides_router:
            return None
        return "dense" if self.teacher.online else "sparse"

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out CE (and KL against an online teacher) over the whole --eval-dataset, all ranks; with
        --general-eval-dataset also the CE there and its change against the frozen base's, in percent."""
        temperature, kl_w = self.schedule.temp(max(self.step - 1, 0)), self.schedule.kl_w(max(self.step - 1, 0))
        s = self._eval_sums(self.eval_seqs, temperature, use_teacher=self.teacher.online)
        out = {"eval_ce": s["ce"] / max(s["targets"], 1)}
        if self.teacher.online:
            out["eval_kl"] = temperature ** 2 * s["kl"] / max(s["targets"], 1)
        out["eval_loss"] = self.cfg.ce_weight * out["eval_ce"] + kl_w * out.get("eval_kl", 0.0)
        if self.general_seqs is not None:
            g = self._eval_sums(self.general_seqs, temperature)
            out["eval_general_ce"] = g["ce"] / max(g["targets"], 1)
            out["eval_general_change"] = self.selection.change(out["eval_general_ce"])
        return out

    @torch.no_grad()
    def _eval_sums(self, seqs, temperature: float, use_teacher: bool = False, base: bool = False) -> dict:
        """The `STATS` sums of the student (`base`: of the frozen base inside it) over all of `seqs`, all ranks."""
        self.model.eval()
        sums = torch.zeros(len(STATS), dtype=torch.float64, device=self.device)
        idx = list(range(self.rank, len(seqs), self.world))
        stream = SequenceStream(seqs, shuffle=False)
        # not the DDP wrapper: ranks may run different batch counts. Sharded, every forward gathers layers from
        # all ranks, so each runs as many batches as rank 0 and a rank out of sequences discards what it computes.
        backbone = self.root if self.root is not None else StudentBackbone(self.model)
        batches = math.ceil(len(range(0, len(seqs), self.world)) / self.cfg.batch_size) \
            if self.root is not None else math.ceil(len(idx) / self.cfg.batch_size)
        with self._as_base() if base else contextlib.nullcontext():
            for i in range(0, batches * self.cfg.batch_size, self.cfg.batch_size):
                chunk = idx[i:i + self.cfg.batch_size]
                ids, mask = trim_padding(*stream.batch(chunk or [0]))
                _, stats = batch_loss(backbone, self.head, self.capture, self.teacher, ids.to(self.device),
                                      mask.to(self.device), {"ce": 1.0, "kl": 0.0}, 0.0, temperature, self.chunk,
                                      use_teacher=use_teacher)
                if chunk:
                    sums += stats
        self.model.train()
        return dict(zip(STATS, dist.all_reduce_sum(sums).tolist()))

    @contextlib.contextmanager
    def _as_base(self):
        """The student run as the unmodified base: shared experts off, the base's routers in place."""
        swap = swapped_weights(self.routers, self.original_routers) if self.model.nexus_config.trainable_router \
            else contextlib.nullcontext()
        with shared_experts_disabled(self.model), swap:
            yield

    # --------------------------------------------------------------------------- --general-eval-dataset
    def _start_selection(self) -> None:
        """The base's general CE, the best adapter so far (best/, after a resume), and at step 0 the first
        evaluation: the initialization is a candidate too."""
        cfg = self.cfg
        base = self._eval_sums(self.general_seqs, 1.0, base=True)
        key = {"max_general_increase": cfg.max_general_increase, "eval_data_fingerprint": self.eval_seqs.fingerprint(),
               "general_data_fingerprint": self.general_seqs.fingerprint()}
        self.selection = GeneralSelection(self.out, key, base["ce"] / max(base["targets"], 1))
        self.selection.resume(self.resumed_selection, self.step, self.rank)
        if self.rank == 0:
            log.info(f"--general-eval-dataset: {len(self.general_seqs)} sequences; the frozen base's CE there is "
                     f"{self.selection.base_ce:.4f}; best/ keeps the lowest eval_ce with a general change under "
                     f"{cfg.max_general_increase:g} %")
        if self.step == 0:
            row = {"step": 0, **self.evaluate()}
            self.metrics.write(row)
            self._select(row)

    def _select(self, row: dict) -> None:
        if self.selection.consider(row):
            self.save_checkpoint(kind=BEST)

    # ------------------------------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict:
        cfg = self.cfg
        return {"format": "nexus-trainer-state", "version": 1, "step": self.step, "max_steps": cfg.max_steps,
                "consumed_sequences": self.step * self.layout.global_batch, "global_batch": self.layout.global_batch,
                "world_size": self.world, "batch_size": cfg.batch_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "seed": cfg.seed,
                "data": self.spec.describe(), "data_fingerprint": self.seqs.fingerprint(),
                "replay": self._replay_state(),
                "router": {"trainable": cfg.train_router, "freeze_step": cfg.router_freeze_step,
                           "frozen": self.router_frozen},
                "schedule": {"step": self.step, **self.schedule.at(max(self.step - 1, 0))},
                "trainable_parameters": self.params.names}

    def _replay_state(self) -> dict | None:
        if self.replay is None:
            return None
        seqs, _, layout = self.replay
        return {"global_batch": layout.global_batch, "data_fingerprint": seqs.fingerprint()}

    def save_checkpoint(self, kind: str | None = None) -> Path:
        """checkpoint-N/: adapter + optimizer, RNG, data position; rank 0 writes.

        `kind` "final" (final/) or "best" (best/, the --general-eval-dataset selection, with its record): the
        adapter and the trainer state only, results rather than resume points. A sharded run gathers every tensor
        whole first (all ranks take part), so its checkpoint is the one a one-process run writes, resumable
        on any number of ranks.
        """
        path = self.out / (kind or f"checkpoint-{self.step}")
        rng = dist.all_gather_object(ckpt.capture_rng()) if kind is None else None
        adapter, optimizer, masters, anchor = None, None, None, self.anchor
        if self.root is not None:
            values = {n: gather_full(p.detach()).cpu() for n, p in zip(self.params.names, self.params.params)}
            adapter = {n: v.to(self.stored_dtypes[n]) for n, v in values.items()}
            masters = {n: v for n, v in values.items() if self.stored_dtypes[n] != torch.float32}
            if kind is None:
                optimizer = gather_optimizer_state(self.optimizer.state_dict())
                anchor = {n: gather_full(v).cpu() for n, v in self.anchor.items()} if self.anchor else None
        elif kind is None:
            optimizer, masters = self.optimizer.state_dict(), self.params.master_state()
        if self.rank == 0:
            state = self._trainer_state()
            if self.selection is not None and self.selection.best is not None:
                state["selection"] = self.selection.best
            if kind is not None:
                ckpt.save(path, self.model, state, adapter=adapter)
            else:
                ckpt.save(path, self.model, state, optimizer, rng, masters, anchor, adapter=adapter)
            removed = [] if kind is not None else ckpt.rotate(self.out, self.cfg.save_total_limit)
            if kind == BEST:
                best = self.selection.best
                log.info(f"step {self.step}: best/ (eval_ce {best['eval_ce']:.4f}, general change "
                         f"{best['eval_general_change']:+.2f} %)")
            else:
                log.info(f"saved {path}" + (f" (removed {', '.join(p.name for p in removed)})" if removed else ""))
        dist.barrier()
        return path

    def _load_checkpoint(self, path: Path) -> None:
        data = ckpt.load(path)
        state = data["state"]
        if state["global_batch"] != self.layout.global_batch:
            raise NexusError(f"--resume-from-checkpoint {path}: made with a global batch of {state['global_batch']} "
                             f"sequences, this run has {self.layout.global_batch} (batch × accumulation × ranks)")
        if state["data_fingerprint"] != self.seqs.fingerprint() or state["seed"] != self.cfg.seed:
            raise NexusError(f"--resume-from-checkpoint {path}: the training data or --seed differ from the run "
                             f"being resumed; resuming would replay or skip data")
        if state.get("replay") != self._replay_state():
            raise NexusError(f"--resume-from-checkpoint {path}: made with --replay-dataset "
                             f"{state.get('replay')}, this run has {self._replay_state()} (the replayed text and "
                             f"its sequences per step must match)")
        if state["trainable_parameters"] != self.params.names:
            raise NexusError(f"--resume-from-checkpoint {path}: trains other parameters than this run "
                             f"(router trainable there: {state['router']['trainable']})")
        load_adapter_weights(self.model, path)
        try:
            self.params.load_master_state(data["masters"])
            optimizer = data["optimizer"]
            if self.root is not None:
                optimizer = optimizer_state_like(optimizer, self.params.opt_params)
            self.optimizer.load_state_dict(optimizer)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise NexusError(f"--resume-from-checkpoint {path}: its optimizer state does not fit this run's "
                             f"trainable weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if data["anchor"] is not None and self.anchor is not None:
            self.anchor = {n: like(v, self.anchor[n]) for n, v in data["anchor"].items()}
        rng = data["rng"]
        if rng is not None and len(rng) == self.world:
            ckpt.restore_rng(rng[self.rank])
        elif self.rank == 0:  # the data order is exact either way; random ops (dropout) are not
            why = f"it holds the RNG states of {len(rng)} processes, this run has {self.world}" if rng is not None \
                else f"it has no {ckpt.RNG}"
            log.warning(f"warning: --resume-from-checkpoint {path}: RNG states not restored ({why}); the data order "
                        f"is exact, but random operations such as dropout will differ from an uninterrupted run")
        self.step = int(state["step"])
        self.resumed_selection = state.get("selection")
        if self.rank == 0:
            log.info(f"resumed from {path} at step {self.step}")

    def cleanup(self) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "capture", None) is not None:
            self.capture.close()
        dist.shutdown()
