"""Building what a training run needs: the student, its teacher, the data. All checks happen here,
before any step runs, and errors name the flag to fix."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..adapter import (attach_from_config, is_adapter_dir, load_adapter_weights, load_model, read_adapter_config,
                       resolve_base)
from ..base.cpu_matmul import compute_frozen_linears_in_fp32
from ..base.loader import build_on_meta, check_model_path, load_base_model, materialize_sharded
from ..data import NoTokenizerError, check_seq_len, load_tokenizer, tokenizer_fingerprint
from ..device import resolve_device, torch_dtype
from ..errors import NexusError
from ..forward import RouterCapture, check_head_split, router_params, vocab_size
from ..fsutil import same_path
from ..moe import find_moe_blocks
from ..shared import attach_shared_experts
from ..sharding import shard_model
from ..stream import DataSpec, SequenceSet, build_sequences
from .config import TrainConfig
from .teachers import CacheTeacher, ModelTeacher, SelfTeacher

log = logging.getLogger("nexus.train")


def student_base_path(student: str) -> str:
    """The base model a student stands on: the adapter's recorded base, or the model itself."""
    if is_adapter_dir(student):
        return resolve_base(Path(student), read_adapter_config(student).base_model_name_or_path)
    return student


def load_student(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, dict[str, torch.Tensor], nn.Module | None]:
    """The student (base frozen, shared experts trainable in fp32), a copy of the base's routers, and with
    --shard-base the FSDP2 root every forward goes through (None otherwise).

    The router copy is taken before any adapter weights are loaded: it is the unmodified base's
    routing, which the self-teacher needs once the student's routers have been trained.
    """
    dtype = torch_dtype(cfg.dtype)
    adapter = is_adapter_dir(cfg.student_model)
    if adapter and cfg.init_strategy:
        raise NexusError(f"--init-strategy applies to a base model; --student-model {cfg.student_model} is an "
                         f"adapter (its weights are the initialization)")
    if adapter and cfg.gate is not None:
        raise NexusError(f"--gate applies to a base model; --student-model {cfg.student_model} is an adapter (its "
                         f"nexus_config.json says whether it has a gate: `nexus convert --gate G` adds one)")
    if not adapter and not cfg.init_strategy:
        raise NexusError(f"--student-model {cfg.student_model} is a base model: pass --init-strategy zero|random, "
                         f"or an adapter directory made by `nexus convert`")
    base = student_base_path(cfg.student_model)
    if cfg.shard_base:
        return _load_sharded_student(cfg, device, adapter, base)
    device_map = {"": str(device)} if device.type == "cuda" else None  # load straight onto the GPU
    model = load_base_model(base, dtype=dtype, device_map=device_map, dequantize=cfg.dequantize,
                            what="--student-model" if not adapter else
                            f"base model of --student-model {cfg.student_model}").to(device)
    blocks = find_moe_blocks(model)
    original = {n: p.detach().clone() for n, p in router_params(blocks).items()}
    if adapter:
        acfg = read_adapter_config(cfg.student_model)
        attach_from_config(model, acfg, source=cfg.student_model)
        load_adapter_weights(model, cfg.student_model)
    else:
        _attach_new(model, cfg)
    _set_router_trainable(model, blocks, cfg)
    return model, original, None


def _attach_new(model: nn.Module, cfg: TrainConfig) -> None:
    attach_shared_experts(model, init=cfg.init_strategy, width_multiplier=cfg.width_multiplier, seed=cfg.seed,
                          gate=cfg.gate)
    if cfg.init_strategy == "zero":
        log.warning("warning: --init-strategy zero: an all-zero gated expert's weight matrices get exactly zero "
                    "gradient (only an output bias, where the family has one, can learn); use random or a "
                    "converted adapter")


def _set_router_trainable(model: nn.Module, blocks, cfg: TrainConfig, config: bool = True) -> None:
    """Routers trainable or not; with `config`, also recorded in the adapter config (after its weights loaded)."""
    if config:  # an adapter whose routers were trained keeps carrying them, even when this run freezes them
        model.nexus_config = replace(model.nexus_config,
                                     trainable_router=model.nexus_config.trainable_router or cfg.train_router)
    for p in router_params(blocks).values():
        p.requires_grad_(cfg.train_router)
    model.config.use_cache = False


def _load_sharded_student(cfg: TrainConfig, device: torch.device, adapter: bool, base: str):
    """--shard-base: built on the meta device, shared experts attached, sharded (FSDP2), then each rank reads
    only its rows of the checkpoint. The router copy is this rank's shards of the base's routers."""
    what = "--student-model" if not adapter else f"base model of --student-model {cfg.student_model}"
    model, plan = build_on_meta(base, dtype=torch_dtype(cfg.dtype), what=what)
    compute_frozen_linears_in_fp32(model)
    blocks = find_moe_blocks(model)
    if adapter:
        attach_from_config(model, read_adapter_config(cfg.student_model), source=cfg.student_model)
    else:
        _attach_new(model, cfg)
    _set_router_trainable(model, blocks, cfg, config=False)  # FSDP2 takes what trains from requires_grad
    root = shard_model(model, device, [b.router for b in blocks] if cfg.train_router else [])
    materialize_sharded(model, plan, device)
    original = {n: p.detach().clone() for n, p in router_params(blocks).items()}
    if adapter:
        load_adapter_weights(model, cfg.student_model)
    _set_router_trainable(model, blocks, cfg)
    return model, original, root


def check_same_vocab(student: nn.Module, teacher: nn.Module, student_tok, teacher_path: str) -> None:
    vs, vt = vocab_size(student), vocab_size(teacher)
    if vs != vt:
        raise NexusError(f"--teacher-model {teacher_path}: its vocabulary has {vt} tokens, the student's {vs}; "
                         f"distillation needs the same vocabulary")
    try:
        teacher_tok = load_tokenizer(teacher_path, what="--teacher-model")
    except NoTokenizerError:  # tokenizer files that do not load are an error (raised as is)
        log.warning(f"warning: --teacher-model {teacher_path}: no tokenizer there, so only the vocabulary sizes were "
                    f"compared ({vs} tokens each); make sure the teacher uses the student's tokenizer")
        return
    ft, fs = tokenizer_fingerprint(teacher_tok), tokenizer_fingerprint(student_tok)
    if ft != fs:
        raise NexusError(f"--teacher-model {teacher_path}: its tokenizer differs from the student's (fingerprints "
                         f"{ft} vs {fs}); distillation needs the same vocabulary")


def make_teacher(cfg: TrainConfig, model: nn.Module, original_routers: dict[str, torch.Tensor],
                 capture: RouterCapture, tokenizer, device: torch.device, root: nn.Module | None = None):
    """The teacher: the cache (--precomputed-teacher), a separate model, or the student's own base."""
    if cfg.precomputed_teacher:
        from ..teacher.cache import TeacherCache

        cache = TeacherCache(cfg.precomputed_teacher)
        check_cache(cache, cfg, model, tokenizer)
        return CacheTeacher(cache, device, list(model.nexus_config.moe_layers))
    tdev = resolve_device(cfg.teacher_device) if cfg.teacher_device else device
    base = student_base_path(cfg.student_model)
    if cfg.teacher_model is None or (same_path(cfg.teacher_model, base) and tdev == device):
        blocks = find_moe_blocks(model)
        swap = model.nexus_config.trainable_router
        return SelfTeacher(model, capture, router_params(blocks), original_routers if swap else None, root)
    check_model_path(cfg.teacher_model, "--teacher-model")
    teacher = load_model(cfg.teacher_model, dtype=torch_dtype(cfg.dtype), dequantize=cfg.dequantize,
                         device_map={"": str(tdev)} if tdev.type == "cuda" else None).to(tdev)
    check_same_vocab(model, teacher, tokenizer, cfg.teacher_model)
    check_seq_len(teacher, cfg.seq_len, "teacher model")
    check_head_split(teacher, tdev)
    try:
        tblocks = find_moe_blocks(teacher)
    except NexusError:
        tblocks = None
    if tblocks is None or [b.layer for b in tblocks] != list(model.nexus_config.moe_layers) or \
            tblocks[0].layout.num_experts != model.nexus_config.num_experts:
        if cfg.router_kl_weight > 0:
            raise NexusError(f"--router-kl-weight needs a teacher with the student's MoE layers and experts; "
                             f"--teacher-model {cfg.teacher_model} has a different layout")
        log.info("teacher has a different MoE layout: router metrics are not computed")
        tblocks = None
    return ModelTeacher(teacher, tdev, tblocks)


def check_cache(cache, cfg: TrainConfig, model: nn.Module, tokenizer) -> None:
    """A cache must match the student's tokenizer, --seq-len and data stream (clear errors otherwise)."""
    where = f"--precomputed-teacher {cfg.precomputed_teacher}"
    fp = tokenizer_fingerprint(tokenizer)
    if cache.tokenizer_fingerprint != fp:
        raise NexusError(f"{where}: made with a different tokenizer (fingerprint {cache.tokenizer_fingerprint}, "
                         f"the student's is {fp})")
    if cache.seq_len != cfg.seq_len:
        raise NexusError(f"{where}: made with --seq-len {cache.seq_len}, this run uses --seq-len {cfg.seq_len}")
    if cache.vocab_size is not None and cache.vocab_size != vocab_size(model):
        raise NexusError(f"{where}: made for a vocabulary of {cache.vocab_size}, the student's has {vocab_size(model)}")
    data = cache.data
    for key, flag in (("pack", "--no-pack"), ("seed", "--seed"), ("shuffle", None), ("text_field", "--text-field")):
        ours = {"pack": cfg.pack, "seed": cfg.seed, "shuffle": True, "text_field": cfg.text_field}[key]
        if key in data and data[key] != ours:
            raise NexusError(f"{where}: made with {key}={data[key]!r}, this run has {key}={ours!r}"
                             + (f" ({flag})" if flag else ""))
    if cfg.router_kl_weight > 0 and not cache.router_topk:
        raise NexusError(f"{where}: holds no router outputs; --router-kl-weight needs a cache made with --router-topk")
    if cache.router_topk and list(cache.moe_layers) != list(model.nexus_config.moe_layers):
        raise NexusError(f"{where}: router outputs for MoE layers {cache.moe_layers}, the student has "
                         f"{list(model.nexus_config.moe_layers)}")


def data_spec(cfg: TrainConfig, dataset: str | None = None) -> DataSpec:
    return DataSpec(dataset=str(dataset or cfg.dataset), seq_len=cfg.seq_len, pack=cfg.pack, seed=cfg.seed,
                    text_field=cfg.text_field, split=cfg.split)


def load_data(cfg: TrainConfig, tokenizer) -> tuple[DataSpec, SequenceSet]:
    """The training sequences; with a cache and no --dataset, the dataset the cache records."""
    dataset = cfg.dataset
    if dataset is None and cfg.precomputed_teacher:
        from ..teacher.cache import TeacherCache

        dataset = TeacherCache(cfg.precomputed_teacher, verify=False).data.get("dataset")
        if dataset is None or not Path(dataset).exists():
            raise NexusError(f"--precomputed-teacher {cfg.precomputed_teacher}: records dataset {dataset!r}, which "
                             f"is not here; pass --dataset (the trainer checks the cache against its own data)")
    spec = data_spec(cfg, dataset)
    return spec, build_sequences(spec, tokenizer)
