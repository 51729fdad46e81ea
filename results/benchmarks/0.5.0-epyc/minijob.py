import sys, time, statistics, os
import torch
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from bench import Case, _adapt, _build
torch.set_num_threads(2)
method = sys.argv[1]
case = Case(method=method, hidden=384, intermediate=1536, heads=12, layers=6, tokens=128, batch=8, rank=8,
            targets="qv", dropout=0.05)
torch.manual_seed(0)
model = _adapt(_build(Case(**{**case.__dict__, "method": "base"})), case)
ids = torch.randint(0, case.vocab, (case.batch, case.tokens))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
model.train()
times = []
for i in range(25):
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    if i >= 5: times.append(time.perf_counter() - t0)
print(statistics.median(times))
