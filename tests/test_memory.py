"""A 100k-token trajectory is scored without O(length x vocab) logits: peak memory is measured in a
fresh process (ru_maxrss), around the scoring call alone."""

import json
import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import json, resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from pipeline.tokens.spans import EncodedConversation
from pipeline.scoring.device import DevicePolicy
from pipeline.scoring.student import ScoringOptions, Student

n_tokens, vocab = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_tokens)
model = LlamaForCausalLM(config).eval()
tokenizer = type("Tokenizer", (), {"pad_token_id": 0, "eos_token_id": 0})()
student = Student(model, tokenizer, ScoringOptions(), policy=DevicePolicy.choose("cpu", token_budget=n_tokens))
ids = torch.randint(0, vocab, (n_tokens,)).tolist()
row = EncodedConversation(ids, list(range(1, n_tokens)), False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
[stats] = student.score([row])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_increase_mb": (after - before) / 1024, "resp_token_length": stats["resp_token_length"]}))
"""


def test_100k_token_row_peak_memory():
    n_tokens, vocab = 100_000, 32_000
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(n_tokens), str(vocab)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.splitlines()[-1])
    full_logits_mb = n_tokens * vocab * 4 / 2**20  # 12,207 MB in float32
    assert measured["resp_token_length"] == n_tokens - 1
    assert measured["peak_increase_mb"] < 1024, measured  # measured here: about 390 MB
    assert measured["peak_increase_mb"] < full_logits_mb / 10
