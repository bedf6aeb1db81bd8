"""Reading single experts from checkpoints: equal to what `from_pretrained` loads, for every on-disk layout."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from quant_checkpoints import GPT_OSS_MXFP4, write_mxfp4_gpt_oss  # noqa: F401 (test_convert* import them from here)
from safetensors import safe_open
from safetensors.torch import save_file

from nexus.convert.checkpoint import ExpertReader, FusedSource, Mxfp4Source, PerExpertSource
from nexus.errors import NexusError

REFERENCE = Path(__file__).parent / "data" / "gpt-oss-20b"  # the released files, kept in the repository


def experts_module(model, reader, layer):
    b = reader.blocks[layer]
    return model.get_submodule(f"{b.path}.{b.experts_name}")


def assert_reader_matches(reader, model):
    for layer in reader.layers:
        experts = experts_module(model, reader, layer)
        for j in range(reader.num_experts):
            got = reader.read_expert(layer, j)
            assert set(got) == {n for n, _ in experts.named_parameters()}
            for name, t in got.items():
                assert t.dtype == torch.float32
                assert torch.equal(t, getattr(experts, name)[j].float()), (layer, j, name)


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    write_mxfp4_gpt_oss(d)
    return d


def test_mxfp4_checkpoint_mirrors_the_released_layout(mxfp4_dir):
    index = json.loads((mxfp4_dir / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00000-of-00001.safetensors",
                                                         "model-00001-of-00001.safetensors"]
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in ExpertReader(mxfp4_dir).files.tensors.values())
    shards_of_layer = {}
    for key, shard in index["weight_map"].items():
        if key.startswith("model.layers."):
            shards_of_layer.setdefault(key.split(".")[2], set()).add(shard)
    assert any(len(s) == 2 for s in shards_of_layer.values())  # a layer straddles two files, as in the release
    reference = json.loads((REFERENCE / "model.safetensors.index.json").read_text())["weight_map"]
    ours_layer0 = {k for k in index["weight_map"] if k.startswith("model.layers.0.")}
    ref_layer0 = {k for k in reference if k.startswith("model.layers.0.")}
    assert ours_layer0 == ref_layer0  # same tensor names, experts as _blocks/_scales/_bias
    config = json.loads((mxfp4_dir / "config.json").read_text())
    assert config["quantization_config"] == json.loads((REFERENCE / "config.json").read_text())["quantization_config"]
    with safe_open(str(mxfp4_dir / index["weight_map"]["model.layers.1.mlp.experts.down_proj_blocks"]), "pt") as f:
        blocks = f.get_tensor("model.layers.1.mlp.experts.down_proj_blocks")
        assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (8, 32, 2, 16)  # [E, out=H, in=I/32, 16]


def test_mxfp4_expert_equals_transformers_dequantized_load(mxfp4_dir):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    reader = ExpertReader(mxfp4_dir)
    assert isinstance(reader.sources["model.layers.0.mlp.experts.gate_up_proj"], Mxfp4Source)
    loaded = AutoModelForCausalLM.from_pretrained(mxfp4_dir, quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.float32)
    assert_reader_matches(reader, loaded)
    # down_proj is [I, H] = [64, 32]: a wrong orientation would not even have the right shape
    assert reader.read_expert(1, 5)["down_proj"].shape == (64, 32)


def test_reads_only_the_expert_asked_for(mxfp4_dir):
    reader = ExpertReader(mxfp4_dir)
    experts_bytes = sum(i.nbytes for k, i in reader.files.tensors.items() if ".experts." in k and "layers.1." in k)
    reader.read_expert(1, 3)
    assert reader.bytes_read == reader.expert_nbytes(1) == experts_bytes // reader.num_experts


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_save_pretrained_layouts(tmp_path, family):
    """What save_pretrained writes in transformers 5: per-expert 2-D tensors, fused for GPT-OSS."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    keys = safe_open(str(tmp_path / "model.safetensors"), "pt").keys()
    reader = ExpertReader(tmp_path)
    source = reader.sources[next(iter(reader.sources))]
    if family == "gpt_oss":
        assert "model.layers.0.mlp.experts.gate_up_proj" in keys and isinstance(source, FusedSource)
    else:
        per_expert = re.compile(r"\.experts\.\d+\.(gate_proj|w1)\.weight$")
        assert any(per_expert.search(k) for k in keys) and isinstance(source, PerExpertSource)
    assert_reader_matches(reader, model)
    assert_reader_matches(reader, AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_unquantized_checkpoint(tmp_path, family):
    """A checkpoint holding the fused 3-D params (bf16) loads in transformers and reads the same."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path)
    reader = ExpertReader(tmp_path)
    assert isinstance(reader.sources["model.layers.0.mlp.experts.gate_up_proj"], FusedSource)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.model.layers[1].mlp.experts.down_proj,
                       model.model.layers[1].mlp.experts.down_proj.to(torch.bfloat16).float())
    assert_reader_matches(reader, loaded)


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_shard(mxfp4_dir, tmp_path):
    d = _copy_checkpoint(mxfp4_dir, tmp_path / "m")
    (d / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(NexusError, match=r"model-00001-of-00001\.safetensors: shard listed .* is missing"):
        ExpertReader(d)


@pytest.mark.parametrize("damage", ["truncate", "header", "tiny"])
def test_truncated_or_corrupted_shard(mxfp4_dir, tmp_path, damage):
    d = _copy_checkpoint(mxfp4_dir, tmp_path / "m")
    shard = d / "model-00000-of-00001.safetensors"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) - 100])
    elif damage == "header":
        shard.write_bytes(data[:8] + b"\x00garbage" + data[16:])
    else:
        shard.write_bytes(data[:5])
    with pytest.raises(NexusError, match=r"model-00000-of-00001\.safetensors: truncated or corrupted"):
        ExpertReader(d)


def test_no_safetensors_and_unsupported_quantization(tmp_path):
    model = tiny_model("qwen3_moe")
    model.config.save_pretrained(tmp_path)
    with pytest.raises(NexusError, match="no model.safetensors"):
        ExpertReader(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NexusError, match="'gptq' quantized checkpoints are not supported"):
        ExpertReader(tmp_path)
    cfg["quantization_config"] = {"quant_method": "fp8"}  # per-tensor scales: no weight_block_size
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NexusError, match="FP8 without weight_block_size"):
        ExpertReader(tmp_path)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_fp8_experts_equal_transformers_dequantized_load(tmp_path, family, layout):
    from quant_checkpoints import load_dequantized_reference, write_fp8_checkpoint

    write_fp8_checkpoint(family, tmp_path, layout)
    reader = ExpertReader(tmp_path)
    kind = FusedSource if layout == "fused" else PerExpertSource
    assert all(isinstance(s, kind) for s in reader.sources.values() if not isinstance(s, FusedSource) or
               layout == "fused")
    assert_reader_matches(reader, load_dequantized_reference(tmp_path, dtype=torch.float32))
