"""Writes tests/data/loader_state_v1.json with the loader of commit dee3967 (before the
torchdata graph): the state after 3 steps and digests of the next 3 batches."""
import hashlib, json, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.datagen import make_docs, write_jsonl
from data_pipeline.loader import LoaderSpec, RankLoader
from data_pipeline.sources import SourceSpec, build_source
from data_pipeline.tokenizer import Llama3Tokenizer
import data_pipeline.loader as L
assert L.__file__.startswith(sys.argv[1]), L.__file__
d = Path(tempfile.mkdtemp()) / "corpus"
write_jsonl(d / "a" / "a.jsonl", make_docs(60, seed=11, max_words=120))
write_jsonl(d / "b" / "b.jsonl", make_docs(40, seed=12, max_words=30))
tok = Llama3Tokenizer()
def loader(lbs=2):
    srcs = [build_source(SourceSpec("jsonl", str(d / x), chunk_bytes=700)) for x in "ab"]
    spec = LoaderSpec(seq_len=24, local_batch_size=lbs, dp_rank=0, dp_world=1, num_workers=int(sys.argv[2]), seed=5,
                      shuffle=True, streams_per_row=2, positions=True)
    return RankLoader(srcs, [0.7, 0.3], tok, spec)
def digest(b):
    h = hashlib.sha256()
    for k in ("input_ids", "labels", "positions", "doc_ids", "source_tokens"):
        h.update(b[k].numpy().tobytes())
    return h.hexdigest()
ld = loader()
for _ in range(3):
    next(ld)
first = ld.state_dict()
ld.close()
ld = loader(1)  # elastic: 4 streams -> 2; the old packers then save literal token tails
ld.load_rank_states([first])
next(ld)
state = ld.state_dict()
after = [digest(next(ld)) for _ in range(3)]
ld.close()
print(json.dumps({"state": state, "next_batches_sha256": after}))
