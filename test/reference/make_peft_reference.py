#!/usr/bin/env python3
"""Reference data for lowrank's PEFT parity tests (test/reference/peft-reference.test.ts).

Run it wherever torch, transformers, peft and safetensors are installed (CPU is enough, about a minute):

    pip install torch transformers peft safetensors
    python test/reference/make_peft_reference.py            # writes test/reference/data/

It builds a tiny random Llama (transformers LlamaConfig, float32), adapters with PEFT, and saves what the tests
compare against. Everything is small (well under 2 MB). Layout of test/reference/data/:

    manifest.json                   versions, the tiny model's config, and one entry per adapter case
    base/                           config.json + model.safetensors (save_pretrained, float32)
    inputs.json                     {"input_ids": [[...], [...]]}  (2 rows x 7 tokens, no padding)
    base_logits.safetensors         {"logits": [2, 7, V]}
    adapters/<case>/                PeftModel.save_pretrained output (adapter_config.json, adapter_model.safetensors)
    logits/<case>.safetensors       {"logits": adapted model (unmerged), "merged_logits": after merge_and_unload}
    merged/<case>.safetensors       state dict of merge_and_unload() (the merged base model, HF names)
    multi/                          one PeftModel with adapters "default" and "other" (other/ is a sub-folder)
    multi_logits.safetensors        {"default": ..., "other": ..., "mixed": ...} for the inputs; "mixed" uses
                                    adapter_names from multi.json
    multi.json                      {"adapter_names": [...]} (one per row of mixed_input_ids) and the input ids
    targets.json                    [{"config": {...LoraConfig kwargs}, "targeted": [module names PEFT wrapped]}]
    inits/<case>.safetensors        PiSSA / OLoRA: {"lora_A", "lora_B", "base_weight"} of
                                    model.layers.0.self_attn.q_proj right after get_peft_model

Adapters use init_lora_weights=False (random A and B), so they are not no-ops and the DoRA magnitude at init is
||W + s B A|| per row, which the tests recompute from the saved A and B.
"""

import json
import os
import sys

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

MODEL_CONFIG = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    initializer_range=0.2,
    attention_bias=False,
    mlp_bias=False,
    hidden_act="silu",
)

INPUT_IDS = [[1, 5, 9, 33, 2, 17, 60], [1, 40, 40, 3, 12, 8, 25]]

# name -> LoraConfig kwargs (init_lora_weights=False unless the case is about an init)
CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora_all_linear": dict(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "dora": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "k_proj", "down_proj"]),
    "patterns_mts_embed": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "o_proj", "gate_proj", "embed_tokens"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"gate_proj": 3},
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
    ),
    "layers_dropout": dict(
        r=3,
        lora_alpha=6,
        lora_dropout=0.1,
        target_modules=["v_proj", "up_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
    ),
    "regex_exclude": dict(
        r=2, lora_alpha=2, target_modules=r".*\.(q|k|v)_proj", exclude_modules=["model.layers.0.self_attn.k_proj"]
    ),
}

# configs whose targeted module list the tests compare (matching rules only; no weights)
TARGET_CONFIGS = [
    dict(target_modules=None),
    dict(target_modules="all-linear"),
    dict(target_modules="ALL-LINEAR"),
    dict(target_modules=["q_proj", "mlp.down_proj"]),
    dict(target_modules=["self_attn.q_proj", "model.layers.1.mlp.up_proj"]),
    dict(target_modules=r".*layers\.1\..*proj"),
    dict(target_modules=r"model\.layers\.\d\.self_attn\.(q|o)_proj"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern=["layers"]),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1], layers_pattern="h"),
    dict(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"]),
    dict(target_modules="all-linear", exclude_modules=r".*\.mlp\..*"),
    dict(target_modules=["q_proj", "lm_head", "embed_tokens"], modules_to_save=["lm_head"]),
    dict(target_modules=["proj"]),
]


def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(**MODEL_CONFIG)
    model = LlamaForCausalLM(cfg).float().eval()
    return model


def logits_of(model, ids=INPUT_IDS, **kw):
    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.float().contiguous()


def state_dict_f32(model):
    return {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}


def main():
    os.makedirs(OUT, exist_ok=True)
    base_dir = os.path.join(OUT, "base")
    model = tiny_model()
    model.save_pretrained(base_dir, safe_serialization=True)
    with open(os.path.join(OUT, "inputs.json"), "w") as f:
        json.dump({"input_ids": INPUT_IDS}, f)
    save_file({"logits": logits_of(model)}, os.path.join(OUT, "base_logits.safetensors"))

    manifest = {
        "versions": {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "model_config": MODEL_CONFIG,
        "cases": {},
    }

    for i, (name, kwargs) in enumerate(CASES.items()):
        base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
        torch.manual_seed(100 + i)
        cfg = LoraConfig(init_lora_weights=False, **kwargs)
        pm = get_peft_model(base, cfg)
        if kwargs.get("modules_to_save"):
            # make the trained copy differ from the original
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if ".modules_to_save.default." in n:
                        p.add_(0.05 * torch.randn_like(p))
        pm.eval()
        adir = os.path.join(OUT, "adapters", name)
        pm.save_pretrained(adir)
        unmerged = logits_of(pm)
        merged_model = pm.merge_and_unload()
        merged = logits_of(merged_model)
        os.makedirs(os.path.join(OUT, "logits"), exist_ok=True)
        os.makedirs(os.path.join(OUT, "merged"), exist_ok=True)
        save_file({"logits": unmerged, "merged_logits": merged}, os.path.join(OUT, "logits", f"{name}.safetensors"))
        save_file(state_dict_f32(merged_model), os.path.join(OUT, "merged", f"{name}.safetensors"))
        manifest["cases"][name] = {"config": {k: v for k, v in kwargs.items()}}

    # two adapters in one PeftModel, saved together; mixed-batch logits
    base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    torch.manual_seed(7)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=8, target_modules=["k_proj", "up_proj"], init_lora_weights=False))
    pm.eval()
    pm.save_pretrained(os.path.join(OUT, "multi"))
    mixed_ids = [INPUT_IDS[0], INPUT_IDS[1], INPUT_IDS[1], INPUT_IDS[0]]
    adapter_names = ["other", "__base__", "default", "default"]
    pm.set_adapter("default")
    out = {"default": logits_of(pm)}
    pm.set_adapter("other")
    out["other"] = logits_of(pm)
    out["mixed"] = logits_of(pm, mixed_ids, adapter_names=adapter_names)
    save_file(out, os.path.join(OUT, "multi_logits.safetensors"))
    with open(os.path.join(OUT, "multi.json"), "w") as f:
        json.dump({"adapter_names": adapter_names, "input_ids": mixed_ids}, f)

    # target matching
    targets = []
    for kw in TARGET_CONFIGS:
        base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
        try:
            pm = get_peft_model(base, LoraConfig(**kw))
            targeted = sorted(pm.base_model.targeted_module_names)
            saved = pm.peft_config["default"].target_modules
            saved = sorted(saved) if isinstance(saved, (set, list)) else saved
            targets.append({"config": kw, "targeted": targeted, "target_modules_after": saved})
        except ValueError as e:
            targets.append({"config": kw, "error": str(e)})
    with open(os.path.join(OUT, "targets.json"), "w") as f:
        json.dump(targets, f, indent=1)

    # weight-rewriting inits
    os.makedirs(os.path.join(OUT, "inits"), exist_ok=True)
    for init in ["pissa", "olora"]:
        base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init))
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        save_file(
            {
                "lora_A": layer.lora_A["default"].weight.detach().contiguous(),
                "lora_B": layer.lora_B["default"].weight.detach().contiguous(),
                "base_weight": layer.base_layer.weight.detach().contiguous(),
            },
            os.path.join(OUT, "inits", f"{init}.safetensors"),
        )

    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
