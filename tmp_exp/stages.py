import itertools, statistics, torch, triton
from memmamba_deploy.models.ops.triton import scan as S
def graph_us(fn, reps=10):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    ts = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1000 / reps)
    return statistics.median(ts)
torch.manual_seed(0)
dev, Di, N, f16 = "cuda", 1536, 16, torch.float16
for T in (2048, 16384):
    xz = torch.randn(1, T, 2 * Di, device=dev, dtype=f16); x, z = xz[..., :Di], xz[..., Di:]
    dbc = torch.randn(1, T, 48 + 2 * N, device=dev, dtype=f16); Bm, Cm = dbc[..., 48:48 + N], dbc[..., 48 + N:]
    dtv = (torch.randn(1, T, Di, device=dev) * 0.5 - 2).to(f16)
    A = -torch.exp(torch.randn(Di, N, device=dev) * 0.5)
    D = torch.randn(Di, device=dev); bias = torch.randn(Di, device=dev) * 0.1; h0 = torch.randn(1, Di, N, device=dev) * .1
    res = []
    for rnd in range(2):
        for st, un in itertools.product([2, 3, 4], [1, 2, 4]):
            S.SEQ_STAGES, S.SEQ_UNROLL = st, un
            us = graph_us(lambda: S.scan_forward(x, dtv, A, Bm, Cm, D, z, bias, h0))
            res.append((round(us, 1), st, un, rnd))
    S.SEQ_STAGES, S.SEQ_UNROLL = 3, 2
    res.sort()
    print(T, res[:8], "today:", [r for r in res if r[1:3] == (3, 2)], flush=True)
