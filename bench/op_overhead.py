"""Per-call cost of the CPU op through the dispatcher: ``torch.ops.mmrprune.cpu_select``.

Run: python3 bench/op_overhead.py.  Prints median microseconds per call (30 runs) for one
16x8 image, k=4, one thread: the op as every caller calls it (``torch.ops.mmrprune.cpu_select``,
the C++ implementation behind torch's dispatcher), its overload object, and a whole
``mmrprune.select``.  Compare the rows only with each other, or with another build run on the
same machine at the same time.
"""
import statistics, time, torch, mmrprune
from mmrprune import ops  # noqa: F401  defines the op; its module registers the CPU implementation
from mmrprune.validation import validate
torch.set_num_threads(1)
x = torch.randn(1, 16, 8); w = torch.rand(1, 16)
b = validate(x, w, k=4, keep_ratio=None, lam=0.5, method="mmr").batch
rows = b.rows(); imp = b.importance().reshape(-1).contiguous()
args = (rows, imp, None, b.starts, b.lengths, b.ks, b.k_max, "mmr", 0.5, 0.5, 1.0, 0.5, 1, 0)
def bench(f, reps=20000):
    for _ in range(500): f(*args)
    ts = []
    for _ in range(30):
        t0 = time.perf_counter()
        for _ in range(reps // 30): f(*args)
        ts.append((time.perf_counter() - t0) / (reps // 30))
    return statistics.median(ts) * 1e6
print("torch", torch.__version__)
for name, f in [("torch.ops.mmrprune.cpu_select", torch.ops.mmrprune.cpu_select),
                ("torch.ops.mmrprune.cpu_select.default", torch.ops.mmrprune.cpu_select.default),
                ("whole mmrprune.select, cpu backend", lambda *a: mmrprune.select(x, w, k=4, backend="cpu"))]:
    print(f"{name:45s} {bench(f, 5000 if 'select,' in name else 20000):7.1f} us")
