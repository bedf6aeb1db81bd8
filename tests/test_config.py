"""NexusConfig: the JSON round trip, files written by earlier versions, and one-line errors naming file and field."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

import pytest

import nexus
from nexus.adapter import CONFIG_NAME
from nexus.config import VERSION, InitProvenance, LayerInit, NexusConfig
from nexus.errors import NexusError

from conftest import tiny_model

# nexus_config.json as the code before NexusConfig wrote it: save_adapter, convert (fractional width),
# and a training checkpoint (save_adapter plus the "training" key).
SAVED = {"format": "nexus-adapter", "version": 1, "base_model_name_or_path": "/models/base", "model_type": "qwen3_moe",
         "moe_layers": [0, 1], "num_experts": 8, "intermediate_size": 16, "width_multiplier": 1,
         "init_strategy": "random", "gate": True, "trainable_router": True, "scale": 1.0, "nexus_version": "0.1.0"}
CONVERTED = {"format": "nexus-adapter", "version": 1, "base_model_name_or_path": "/models/base",
             "model_type": "qwen3_moe", "moe_layers": [0, 1], "num_experts": 8, "intermediate_size": 4,
             "width_multiplier": 0.25, "init_strategy": "pca_top2", "gate": False, "trainable_router": False,
             "scale": 1.0, "nexus_version": "0.1.0",
             "init": {"strategy": "pca_top2", "seed": 0, "scale": 1.0, "width_multiplier": 0.25,
                      "pca_stats": "/runs/pca.json",
                      "layers": {"0": {"experts": [3, 1], "weights": [0.5714285714285715, 0.4285714285714286],
                                       "kept_units": [2, 4, 6, 8]},
                                 "1": {"experts": [0, 7], "weights": [0.5, 0.5], "kept_units": [6, 8, 11, 15]}}}}
CHECKPOINT = dict(SAVED, training={"step": 2, "output_dir": "/runs/train"})
LEGACY = {"saved": SAVED, "converted": CONVERTED, "checkpoint": CHECKPOINT}


def config(**changes) -> NexusConfig:
    fields = dict(base_model_name_or_path="/models/base", model_type="gpt_oss", moe_layers=(0, 1, 2), num_experts=32,
                  intermediate_size=704, width_multiplier=0.25, init_strategy="pca_top24", nexus_version="0.1.0",
                  init=InitProvenance(seed=3, pca_stats="pca_stats.json",
                                      layers=(LayerInit(0, (7, 3), (0.6, 0.4)), LayerInit(1, (1, 2), (0.5, 0.5), (5,)),
                                              LayerInit(2, (0,), (1.0,)))))
    return NexusConfig(**{**fields, **changes})


@pytest.mark.parametrize("cfg", [config(), config(init=None, gate=True, trainable_router=True, scale=2.5),
                                 config(init=InitProvenance(seed=0), width_multiplier=3),
                                 config(init=InitProvenance(seed=1, pca_stats="p.json", hidden_sample="rs.raw.safetensors",
                                                            layers=(LayerInit(0, (7, 3), (0.6, 0.4), (1, 5)),)))])
def test_round_trip_through_a_file(cfg, tmp_path):
    path = tmp_path / CONFIG_NAME
    cfg.to_json_file(path)
    assert NexusConfig.from_json_file(path) == cfg
    assert NexusConfig.from_dict(cfg.to_dict()) == cfg
    data = json.loads(path.read_text())
    assert list(data)[:4] == ["format", "version", "base_model_name_or_path", "model_type"]
    assert data["format"] == "nexus-adapter" and data["version"] == VERSION
    assert [p.name for p in tmp_path.iterdir()] == [CONFIG_NAME]  # the atomic write left no temporary


@pytest.mark.parametrize("name", LEGACY)
def test_files_written_by_earlier_versions_load(name):
    old = LEGACY[name]
    cfg = NexusConfig.from_dict(copy.deepcopy(old), source="old.json")
    new = cfg.to_dict()
    # only keys nothing read are dropped: the checkpoint's "training", init's copies of top-level fields
    assert {k: v for k, v in old.items() if k not in ("training", "init")} == {k: v for k, v in new.items()
                                                                                 if k != "init"}
    if "init" in old:
        assert new["init"] == {k: v for k, v in old["init"].items() if k not in ("strategy", "scale",
                                                                                  "width_multiplier")}
        assert cfg.init.layers[1] == LayerInit(1, (0, 7), (0.5, 0.5), (6, 8, 11, 15))


def test_instances_are_frozen_and_replace_checks():
    cfg = config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trainable_router = True
    assert dataclasses.replace(cfg, trainable_router=True).trainable_router
    with pytest.raises(NexusError, match=r"^NexusConfig: 'num_experts' must be an integer, got \"8\"$"):
        dataclasses.replace(cfg, num_experts="8")
    assert config(width_multiplier=2.0).width_multiplier == 2 and isinstance(config(moe_layers=[1]).moe_layers, tuple)


def _without(key):
    data = copy.deepcopy(SAVED)
    del data[key]
    return data


BAD = [  # (file contents, message after "<file>: ")
    ([1, 2], r"not a NEXUS adapter config \('format' is not a JSON object"),
    (dict(SAVED, format="nexus-pca-stats"), r"not a NEXUS adapter config \('format' is \"nexus-pca-stats\""),
    (dict(SAVED, version=2), r"'version' is 2: the adapter was written by a newer NEXUS; this one reads up to "
                             r"version 1 \(upgrade NEXUS\)"),
    (dict(SAVED, version="1"), r"'version' must be an integer, got \"1\""),
    (_without("version"), r"'version' is missing"),
    (dict(SAVED, lora_rank=8), r"'lora_rank' is not a field this NEXUS knows \(known: base_model_name_or_path, "),
    (_without("moe_layers"), r"'moe_layers' is missing"),
    (_without("base_model_name_or_path"), r"'base_model_name_or_path' is missing"),
    (_without("intermediate_size"), r"'intermediate_size' is missing"),
    (dict(SAVED, moe_layers="0,1"), r"'moe_layers' must be a list of integers, got \"0,1\""),
    (dict(SAVED, moe_layers=[0, 1.5]), r"'moe_layers\[1\]' must be an integer, got 1.5"),
    (dict(SAVED, moe_layers=[]), r"'moe_layers' is empty"),
    (dict(SAVED, num_experts=0), r"'num_experts' must be at least 1, got 0"),
    (dict(SAVED, width_multiplier=-1), r"'width_multiplier' must be positive, got -1"),
    (dict(SAVED, width_multiplier=True), r"'width_multiplier' must be a finite number, got true"),
    (dict(SAVED, scale=math.inf), r"'scale' must be a finite number, got Infinity"),
    (dict(SAVED, gate="yes"), r"'gate' must be true or false, got \"yes\""),
    (dict(SAVED, model_type=None), r"'model_type' must be a string, got null"),
    (dict(CONVERTED, init={"layers": {}}), r"'init.seed' is missing"),
    (dict(CONVERTED, init={"seed": 0, "source": "x"}), r"'init.source' is not a field this NEXUS knows"),
    (dict(CONVERTED, init={"seed": 0, "layers": {"0": {"experts": [1], "weights": [0.5, 0.5]}}}),
     r"'init.layers.0.weights' has 2 entries for 1 experts"),
    (dict(CONVERTED, init={"seed": 0, "layers": {"x": {"experts": [1], "weights": [1]}}}),
     r"'init.layers.x' is not a decoder-layer index"),
    (dict(CONVERTED, init={"seed": 0, "layers": {"1": {"experts": "3", "weights": [1]}}}),
     r"'init.layers.1.experts' must be a list of integers"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m.split("'")[1] if "'" in m else m[:20] for _, m in BAD])
def test_bad_files_are_one_line_errors_naming_file_and_field(data, message, tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps(data))
    with pytest.raises(NexusError) as err:
        NexusConfig.from_json_file(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: ")
    assert re.search(message, text), text


def test_an_adapter_keeps_its_init_record_when_loaded_and_saved_again(tmp_path):
    """A converted adapter trained further still says how it was initialized."""
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "base")
    model = nexus.load_model(tmp_path / "base")
    nexus.attach_shared_experts(model, init="random", seed=0)
    assert isinstance(model.nexus_config, NexusConfig) and model.nexus_config.init_strategy == "random"
    nexus.save_adapter(model, tmp_path / "a")
    data = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    data.update(init_strategy="pca_top2", init={"seed": 5, "pca_stats": "p.json",
                                                "layers": {"0": {"experts": [1, 2], "weights": [0.5, 0.5]},
                                                           "1": {"experts": [3, 4], "weights": [0.5, 0.5]}}})
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(data))
    loaded = nexus.load_model(tmp_path / "a")
    nexus.save_adapter(loaded, tmp_path / "b")
    again = json.loads((tmp_path / "b" / CONFIG_NAME).read_text())
    assert again == data and loaded.nexus_config == NexusConfig.from_dict(data)
