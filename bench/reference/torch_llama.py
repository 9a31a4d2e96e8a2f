"""PyTorch reference for npm run bench:train and bench:generate, measured in the same run as lowrank.

The workloads of ../shared/anchors.md, on whatever CPU runs the bench: eager fp32 PyTorch, a Llama (RMSNorm,
RoPE, GQA, SwiGLU, tied embeddings) written the way transformers' modeling_llama writes it, LoRA r=16
alpha=32 on q,k,v,o,gate,up,down as PEFT adds it (base(x) + B(A(x)) * alpha / r, B zero, A kaiming-uniform),
AdamW, gradient clipping at 1.0, labels = input ids. PEFT and transformers are not on these machines (Debian
packages only), so the model and the adapter are written here, in plain torch, with the same arithmetic.

  python3 torch_llama.py '{"config": {...HF config.json...}, "mode": "lora", "batch": 8, "seq": 256,
                          "steps": 3, "warmup": 1, "threads": 2}'

mode: lora | full (training; tokens/s per step), generate (prefill of `seq` tokens, then `decode` greedy
tokens with a KV cache, `rounds` times; "dtype": "float32" or "bfloat16"). Prints one JSON line: the fastest
and median figures, every step's seconds and the peak RSS of this process.

mode check ({"model_dir": HF dir of f32 safetensors, "adapter_dir": PEFT LoRA dir or null, "ids": [[...]]}):
the logits, the summed next-token cross-entropy and its gradients with respect to the LoRA weights and DoRA
magnitudes (by their PEFT names), so test/reference/torch-llama.test.ts can check that this reference computes what lowrank does.

Needs torch with a fast BLAS. On Debian: apt-get install python3-torch libopenblas0-openmp. Without OpenBLAS
torch falls back to the reference BLAS, 30x slower, and the comparison means nothing. OpenBLAS's OpenMP
build shares torch's OpenMP threads; its pthread build (libopenblas0-pthread, which update-alternatives
prefers where both are installed) keeps two spinning thread pools on the same cores, which measured 1.5-2x
slower here (tiny LoRA: 640-790 tokens/s against 1270-1900). The figures name the BLAS that was loaded.
"""

import json
import math
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        v = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(v + self.eps))


class LoraLinear(nn.Module):
    """PEFT's LoRA layer with dropout 0: base(x) + lora_B(lora_A(x)) * scaling. With DoRA, PEFT's
    DoraLinearLayer: the output scaled per row by magnitude / ||W + scaling B A|| (the norm detached), the
    magnitude starting as the row norms of W."""

    def __init__(self, base, r, alpha, dora=False):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r
        self.dora = dora
        if dora:
            self.lora_magnitude_vector = nn.Parameter(base.weight.detach().norm(p=2, dim=1))

    def forward(self, x):
        base = self.base(x)
        lora = self.lora_B(self.lora_A(x)) * self.scaling
        if not self.dora:
            return base + lora
        w = self.base.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight)
        scale = self.lora_magnitude_vector / w.norm(p=2, dim=1).detach()
        return base + (scale - 1) * base + scale * lora


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h = c["num_attention_heads"]
        self.kvh = c.get("num_key_value_heads", self.h)
        self.d = c.get("head_dim") or c["hidden_size"] // self.h
        hs = c["hidden_size"]
        self.q_proj = nn.Linear(hs, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(hs, self.kvh * self.d, bias=False)
        self.v_proj = nn.Linear(hs, self.kvh * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, hs, bias=False)

    def forward(self, x, cos, sin, mask, past):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kvh, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kvh, self.d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        rep = self.h // self.kvh
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.d)
        if mask is not None:
            s = s + mask
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(p, v).transpose(1, 2).reshape(B, T, self.h * self.d)
        return self.o_proj(o), present


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        hs, i = c["hidden_size"], c["intermediate_size"]
        self.gate_proj = nn.Linear(hs, i, bias=False)
        self.up_proj = nn.Linear(hs, i, bias=False)
        self.down_proj = nn.Linear(i, hs, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        eps = c.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(c["hidden_size"], eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, past):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c.get("rms_norm_eps", 1e-6))
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        if c.get("tie_word_embeddings", False):
            self.lm_head.weight = self.embed_tokens.weight
        for m in self.modules():  # transformers' init: normal(0, 0.02)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        d = self.layers[0].self_attn.d
        theta = c.get("rope_theta", 10000.0)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))

    def rope(self, start, T, dtype):
        t = torch.arange(start, start + T, dtype=torch.float32)
        f = torch.outer(t, self.inv_freq)
        e = torch.cat((f, f), dim=-1)
        return e.cos().to(dtype), e.sin().to(dtype)

    def forward(self, ids, past=None):
        B, T = ids.shape
        start = 0 if past is None else past[0][0].shape[2]
        x = self.embed_tokens(ids)
        cos, sin = self.rope(start, T, x.dtype)
        mask = None
        if T > 1:
            mask = torch.full((T, T), float("-inf"), dtype=x.dtype).triu(1)
            if start:
                mask = torch.cat((torch.zeros(T, start, dtype=x.dtype), mask), dim=1)
        presents = []
        for i, layer in enumerate(self.layers):
            x, p = layer(x, cos, sin, mask, None if past is None else past[i])
            presents.append(p)
        return self.lm_head(self.norm(x)), presents


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, r, alpha, dora=False):
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                if hasattr(parent, name):
                    setattr(parent, name, LoraLinear(getattr(parent, name), r, alpha, dora))


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(spec, model):
    B, T = spec["batch"], spec["seq"]
    V = model.c["vocab_size"]
    if spec["mode"] == "lora":
        add_lora(model, spec.get("r", 16), spec.get("alpha", 32))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()
    g = torch.Generator().manual_seed(1)
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        ids = torch.randint(3, V, (B, T), generator=g)
        t0 = time.perf_counter()
        logits, _ = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    s = sorted(times)
    return {
        "tokensPerSecond": B * T / s[0],
        "medianTokensPerSecond": B * T / s[len(s) // 2],
        "stepSeconds": times,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
    }


@torch.no_grad()
def generate(spec, model):
    model.eval()
    model.to(getattr(torch, spec.get("dtype", "float32")))
    V = model.c["vocab_size"]
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, V, (1, spec["seq"]), generator=g)
    # warm-up: a short prefill and a few decode steps
    logits, past = model(prompt[:, :8])
    for _ in range(4):
        logits, past = model(logits[:, -1:].argmax(-1), past)
    n = spec["decode"]
    prefills, decodes = [], []
    # rounds of a fresh cache each, as bench:generate runs lowrank: the fastest and the median
    for _ in range(spec.get("rounds", 1)):
        t0 = time.perf_counter()
        logits, past = model(prompt)
        prefills.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n):
            logits, past = model(logits[:, -1:].argmax(-1), past)
        decodes.append(time.perf_counter() - t0)
    prefills.sort()
    decodes.sort()
    return {
        "prefillTokensPerSecond": spec["seq"] / prefills[0],
        "decodeTokensPerSecond": n / decodes[0],
        "decodeMedianTokensPerSecond": n / decodes[len(decodes) // 2],
        "decodeSeconds": decodes,
    }


def gemm_gflops():
    """torch's sgemm at 1024^3, best of 5: shows whether a fast BLAS is behind torch (OpenBLAS: 100-200)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best / 1e9


def blas_library():
    """The BLAS torch loaded (Debian's torch takes whichever libblas.so.3 update-alternatives points at)."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "blas" in line.split()[-1].rsplit("/", 1)[-1]}
    except OSError:
        return "unknown"
    return ", ".join(sorted(libs)) or "none found"


def read_safetensors(path):
    """An f32 safetensors file as {name: tensor} (the format: u64 header length, JSON header, raw data)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise SystemExit(f"{path}: {name} is {info['dtype']}; the check reads F32 only")
        a, b = info["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32).reshape(info["shape"])
    return out


def check(spec):
    """Logits, summed shifted cross-entropy and LoRA / DoRA gradients of a saved model (and adapter)."""
    with open(f"{spec['model_dir']}/config.json") as f:
        c = json.load(f)
    model = Llama(c)
    state = {k.removeprefix("model."): v for k, v in read_safetensors(f"{spec['model_dir']}/model.safetensors").items()}
    if c.get("tie_word_embeddings", False):
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    prefix = "base_model.model.model."
    lora = {}
    if spec.get("adapter_dir"):
        with open(f"{spec['adapter_dir']}/adapter_config.json") as f:
            ac = json.load(f)
        if ac.get("use_rslora"):
            raise SystemExit("check: rsLoRA adapters are not supported here")
        add_lora(model, ac["r"], ac["lora_alpha"], bool(ac.get("use_dora")))
        params = dict(model.named_parameters())
        for name, t in read_safetensors(f"{spec['adapter_dir']}/adapter_model.safetensors").items():
            p = params[name.removeprefix(prefix)]
            with torch.no_grad():
                p.copy_(t)
            lora[name] = p
    ids = torch.tensor(spec["ids"])
    logits, _ = model(ids)
    V = c["vocab_size"]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    return {
        "logits": logits.detach().reshape(-1).tolist(),
        "loss": loss.item(),
        "grads": {n: p.grad.reshape(-1).tolist() for n, p in lora.items()},
    }


def main():
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads", 2))
    torch.manual_seed(0)
    if spec["mode"] == "check":
        print(json.dumps(check(spec)))
        return
    gemm = gemm_gflops()
    model = Llama(spec["config"])
    if spec["mode"] in ("lora", "full"):
        out = train(spec, model)
    elif spec["mode"] == "generate":
        out = generate(spec, model)
    else:
        raise SystemExit(f"unknown mode {spec['mode']!r} (lora, full or generate)")
    out["peakRssBytes"] = peak_rss()
    out["gemmGflops"] = gemm
    out["blas"] = blas_library()
    out["torch"] = torch.__version__
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
