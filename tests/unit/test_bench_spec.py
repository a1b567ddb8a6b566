"""`tierserve bench spec`'s measurement on a tiny checkpoint: the plain and speculating engines alternate, the
greedy check compares their tokens, the table, JSON and PNG are written."""

import dataclasses
import json

from tests.unit.test_engine import make_engine
from cluster.tools.bench_spec import SpecBenchResult, _measure_cell, format_table, write_plot
from cluster.tools.spec_prompts import FAMILIES, family_prompts
from workers.config import SpeculativeConfig
from workers.sampling_params import SamplingParams


def test_prompt_families_are_templated_and_distinct(tiny_loaded):
    for family in FAMILIES:
        prompts = family_prompts(family, tiny_loaded.tokenizer, 3)
        assert len(prompts) == 3 and all("<|im_start|>user" in p for p in prompts)
    assert family_prompts("code", tiny_loaded.tokenizer, 2)[0] != family_prompts("code", tiny_loaded.tokenizer, 2)[1]


def test_a_cell_compares_plain_and_speculating_runs(tiny_loaded, tmp_path):
    plain = make_engine(tiny_loaded, max_num_seqs=8)
    spec = make_engine(tiny_loaded, max_num_seqs=8,
                       speculative=SpeculativeConfig(method="ngram", ngram_min=1, ngram_max=3))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    cell = _measure_cell(plain, spec, "ngram", "code", 2, tiny_loaded.tokenizer, params, rounds=2)
    assert cell.greedy_exact and cell.output_tokens == 24
    assert len(cell.runs["ratio"]) == 2 and cell.plain_decode_tok_s > 0 and cell.spec_decode_tok_s > 0
    assert cell.mean_acceptance_length >= 1.0
    result = SpecBenchResult(model="tiny", max_tokens=12, rounds=2, threads=1, num_speculative_tokens=4,
                             max_batch_size=8, cells=[cell],
                             llama_server=[{"family": "code", "draft": True, "decode_tok_s": 9.5,
                                            "draft_acceptance": 0.5}])
    table = format_table(result)
    assert "ngram" in table and "yes" in table and "llama-server" in table
    write_plot(result, str(tmp_path / "spec.png"))
    assert (tmp_path / "spec.png").stat().st_size > 1000
    assert json.loads(json.dumps(dataclasses.asdict(result)))["cells"][0]["greedy_exact"] is True
