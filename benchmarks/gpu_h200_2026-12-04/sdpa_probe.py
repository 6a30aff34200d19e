"""Per-new-shape cost of PyTorch SDPA backends at decode shapes (q=1, bool mask), fp16 on CUDA."""
import json, os, statistics, time
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
dev = torch.device("cuda")
B, H, D = 32, 32, 64
out = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "rows": {}}
def call(L):
    q = torch.randn(B, H, 1, D, device=dev, dtype=torch.float16)
    k = torch.randn(B, H, L, D, device=dev, dtype=torch.float16); v = torch.randn_like(k)
    m = torch.ones(B, 1, 1, L, device=dev, dtype=torch.bool)
    torch.cuda.synchronize(); t = time.perf_counter()
    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m); torch.cuda.synchronize()
    t1 = time.perf_counter() - t; t = time.perf_counter()
    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m); torch.cuda.synchronize()
    return t1, time.perf_counter() - t
call(100)
base = 200
for name, backs in [("default", None), ("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
                    ("math", [SDPBackend.MATH]), ("no-cudnn", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])]:
    firsts, seconds = [], []
    try:
        for L in range(base, base + 16):
            if backs is None:
                f, s2 = call(L)
            else:
                with sdpa_kernel(backs):
                    f, s2 = call(L)
            firsts.append(f); seconds.append(s2)
        out["rows"][name] = {"first_call_ms_median": 1e3 * statistics.median(firsts), "second_call_ms_median": 1e3 * statistics.median(seconds)}
    except Exception as e:
        out["rows"][name] = {"error": repr(e)[:200]}
    base += 100
print(json.dumps(out, indent=1))
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "sdpa_probe.json"), "w"), indent=1)
