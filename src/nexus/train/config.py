"""`nexus train` settings: one dataclass, its flags, and flag-level validation.

Field names are the flag names (`--learning-rate` -> `learning_rate`); the defaults here are the
flag defaults, so the CLI, the Python API and the tests see one set of values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import NexusError
from ..moe import check_width
from .schedule import Schedule

DEFAULT_BIAS_FREEZE_RATIO = 0.5  # the original tool's recommendation for a trainable router


@dataclass
class TrainConfig:
    student_model: str
    output_dir: str
    dataset: str | None = None
    teacher_model: str | None = None
    teacher_device: str | None = None
    precomputed_teacher: str | None = None
    text_field: str = "text"
    split: str | None = None
    eval_dataset: str | None = None
    eval_every: int = 0
    seq_len: int | None = None  # None: the teacher cache's, else from the model (nexus.defaults.seq_len_for)
    pack: bool = True
    init_strategy: str | None = None
    width_multiplier: float = 1
    freeze_router: bool | None = None
    bias_freeze_ratio: float | None = None
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    router_kl_weight: float = 0.0
    temperature: float = 2.0
    final_temperature: float = 1.0
    temperature_anneal_start: float = 0.5
    kl_weight_warmup: bool = False
    use_advanced_scheduler: bool = False
    warmup_ratio: float = 0.1
    stable_ratio: float = 0.5
    final_lr_ratio: float = 0.1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    gradient_clip_val: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    dequantize: bool = False
    checkpoint_interval: int = 500
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    logging_steps: int = 10
    kl_chunk_size: int = 0
    sfa_interval: int = 0
    sfa_alpha: float = 0.5
    kl_warn_threshold: float = 0.15
    grad_spike_threshold: float = 5.0
    router_l1_warn_threshold: float = 0.5

    @classmethod
    def from_args(cls, args) -> TrainConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def to_dict(self) -> dict:
        return asdict(self)

    # --- derived settings -------------------------------------------------------------------------
    @property
    def train_router(self) -> bool:
        """Router trainable in this run: --no-freeze-router, or --bias-freeze-ratio without --freeze-router."""
        if self.freeze_router is not None:
            return not self.freeze_router
        return self.bias_freeze_ratio is not None

    @property
    def router_freeze_step(self) -> int | None:
        """Optimizer steps taken with a trainable router (None when the router is frozen throughout)."""
        if not self.train_router:
            return None
        ratio = DEFAULT_BIAS_FREEZE_RATIO if self.bias_freeze_ratio is None else self.bias_freeze_ratio
        return int(math.ceil(ratio * self.max_steps))

    def schedule(self) -> Schedule:
        return Schedule(max_steps=self.max_steps, peak_lr=self.learning_rate, advanced=self.use_advanced_scheduler,
                        warmup_ratio=self.warmup_ratio, stable_ratio=self.stable_ratio,
                        final_lr_ratio=self.final_lr_ratio, temperature=self.temperature,
                        final_temperature=self.final_temperature,
                        temperature_anneal_start=self.temperature_anneal_start, kl_weight=self.kl_weight,
                        kl_weight_warmup=self.kl_weight_warmup)

    def check(self) -> None:
        """Errors that need no file access; each names the flag to fix."""
        self.schedule()  # validates the schedule flags
        positive = {"--batch-size": self.batch_size, "--gradient-accumulation-steps": self.gradient_accumulation_steps,
                    "--checkpoint-interval": self.checkpoint_interval}
        for flag, value in positive.items():
            if value < 1:
                raise NexusError(f"{flag} must be at least 1, got {value}")
        self.width_multiplier = check_width(self.width_multiplier)
        if self.seq_len is not None and self.seq_len < 2:
            raise NexusError(f"--seq-len must be at least 2, got {self.seq_len}")
        for flag, value in {"--ce-weight": self.ce_weight, "--router-kl-weight": self.router_kl_weight,
                            "--weight-decay": self.weight_decay, "--gradient-clip-val": self.gradient_clip_val,
                            "--eval-every": self.eval_every, "--sfa-interval": self.sfa_interval,
                            "--kl-chunk-size": self.kl_chunk_size}.items():
            if value < 0:
                raise NexusError(f"{flag} must be non-negative, got {value}")
        if self.ce_weight == 0 and self.kl_weight == 0 and self.router_kl_weight == 0:
            raise NexusError("--ce-weight, --kl-weight and --router-kl-weight are all 0: nothing to train on")
        if self.freeze_router and self.bias_freeze_ratio is not None:
            raise NexusError("--bias-freeze-ratio applies to a trainable router; it conflicts with --freeze-router "
                             "(use --no-freeze-router --bias-freeze-ratio R)")
        if self.bias_freeze_ratio is not None and not 0 <= self.bias_freeze_ratio <= 1:
            raise NexusError(f"--bias-freeze-ratio must be in [0, 1], got {self.bias_freeze_ratio}")
        if not 0 < self.sfa_alpha < 1:
            raise NexusError(f"--sfa-alpha must be in (0, 1), got {self.sfa_alpha}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise NexusError(f"--save-total-limit must be at least 1, got {self.save_total_limit}")
        if self.init_strategy not in (None, "zero", "random"):
            raise NexusError(f"--init-strategy must be zero or random, got {self.init_strategy}")
        if self.precomputed_teacher and self.teacher_model:
            raise NexusError("pass either --teacher-model (online distillation) or --precomputed-teacher "
                             "(offline), not both")
        if not self.dataset and not self.precomputed_teacher:
            raise NexusError("--dataset is required (with --precomputed-teacher it defaults to the cache's dataset)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise NexusError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype}")
