"""The evaluate stage and flow: held-out bits per byte, lm-eval parity, lineage, the CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from refinery_testlib import shared_file

ROOT = Path(__file__).resolve().parents[2]
EVAL_CONFIGS = ROOT / "configs" / "eval"
REFINERY = str(Path(sys.executable).parent / "refinery")
GSM8K = "eval/gsm8k-test.jsonl"


# --------------------------------------------------------------------------- held-out scoring
def test_windows_predict_every_token_once_within_the_context():
    from refinery.tasks.eval.perplexity import windows

    ids = list(range(100, 137))
    for max_length, stride in ((8, 3), (8, 8), (64, 32), (2, 1)):
        wins = windows(ids, 0, max_length, stride)
        assert [t for _, tg in wins for t in tg] == ids
        seq = [0, *ids]
        for inp, tg in wins:
            assert len(inp) <= max_length
            # the inputs are the tokens right before each target, in order
            end = seq.index(tg[-1], 1)
            assert inp == seq[end - len(inp):end]
    assert windows([], 0, 8, 4) == []


def test_bits_per_byte_is_the_summed_nll_of_every_text_token(tiny_causal_lm_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.tasks.eval.perplexity import LN2, aggregate, score_documents

    tok = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Grüße aus Köln!", "x"]
    scores = score_documents(model, tok, texts, max_length=256, batch_size=3)
    for text, s in zip(texts, scores):   # direct: one forward pass over BOS + the whole text
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        nll = -logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        assert s.tokens == len(ids) - 1 and s.bytes == len(text.encode())
        assert s.nll == pytest.approx(nll, rel=1e-5)
        assert s.bits_per_byte == pytest.approx(nll / (LN2 * len(text.encode())), rel=1e-5)
    # batching pads windows: it must not change any score; short windows change the context only
    one = score_documents(model, tok, texts, max_length=256, batch_size=1)
    assert [s.nll for s in one] == pytest.approx([s.nll for s in scores], rel=1e-5)
    short = aggregate(score_documents(model, tok, texts, max_length=8, stride=4))
    assert short["tokens"] == sum(s.tokens for s in scores) and math.isfinite(short["bits_per_byte"])
    agg = aggregate(scores)
    assert agg["perplexity"] == pytest.approx(math.exp(sum(s.nll for s in scores) / agg["tokens"]))


# --------------------------------------------------------------------------- lm-eval parity
def _stage_and_lm_eval(tmp_path, model_dir, task_files: list[str], data_files: dict, limit: int, gen: str | None):
    import lm_eval

    from refinery.tasks.eval.harness import lm_eval_tasks, resolve_tasks
    from refinery.tasks.eval.stage import EvalConfig, ModelSpec, evaluate, read_results

    specs = resolve_tasks(task_files, data_files)
    cfg = EvalConfig(models=[ModelSpec(label="tiny", path=str(model_dir))], tasks=specs, limit=limit, seed=7,
                     gen_kwargs=gen, batch_size=4, device="cpu", prompts=[])
    ds = evaluate.run(tmp_path / "work", [], cfg)
    ours = {(r["task"], r["metric"]): (r["value"], r["stderr"], r["n"]) for r in read_results(ds)}
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "device": "cpu"},
                                     batch_size=4, tasks=lm_eval_tasks(specs), limit=limit, gen_kwargs=gen,
                                     random_seed=7, numpy_random_seed=7, torch_random_seed=7, fewshot_random_seed=7)
    return ds, ours, theirs


def _assert_parity(ours: dict, theirs: dict) -> None:
    expected = {}
    for task, res in theirs["results"].items():
        for key, value in res.items():
            if key in ("alias", "name", "sample_len") or "_stderr" in key:
                continue
            metric, _, filt = key.partition(",")
            stderr = res.get(f"{metric}_stderr,{filt}")
            expected[(task, key)] = (value, None if stderr == "N/A" else stderr, theirs["n-samples"][task]["effective"])
    assert set(ours) == set(expected)
    for k, (value, stderr, n) in expected.items():
        assert ours[k][0] == pytest.approx(value, abs=1e-12), k
        assert ours[k][1] == (pytest.approx(stderr, abs=1e-12) if stderr is not None else None), k
        assert ours[k][2] == n, k


def test_multiple_choice_numbers_equal_lm_eval_s_own(tmp_path, tiny_causal_lm_dir):
    ds, ours, theirs = _stage_and_lm_eval(tmp_path, tiny_causal_lm_dir, [str(EVAL_CONFIGS / "mc_local.yaml")], {},
                                          limit=10, gen=None)
    _assert_parity(ours, theirs)
    assert ("mc_local", "acc,none") in ours and ours[("mc_local", "acc,none")][2] == 10
    import pyarrow.parquet as pq

    samples = pq.read_table(Path(ds.path) / "samples" / "tasks.parquet").to_pylist()
    assert len(samples) == 10 and all(s["task"] == "mc_local" and "Question:" in s["prompt"] for s in samples)


def test_gsm8k_local_numbers_equal_lm_eval_s_own(tmp_path, tiny_causal_lm_dir, shared_data):
    gsm8k = shared_file(shared_data, GSM8K)
    ds, ours, theirs = _stage_and_lm_eval(tmp_path, tiny_causal_lm_dir, [str(EVAL_CONFIGS / "gsm8k_local.yaml")],
                                          {"gsm8k_local": str(gsm8k)}, limit=3, gen="max_gen_toks=12")
    _assert_parity(ours, theirs)
    assert ours[("gsm8k_local", "exact_match,strict-match")][0] == 0.0   # a random tiny model: about zero
    import hashlib

    # the data file's content is part of the task's identity (and so of the fingerprint)
    assert ds.config["tasks"][0]["data_sha256"] == {str(gsm8k.resolve()): hashlib.sha256(gsm8k.read_bytes()).hexdigest()}


def test_chat_models_are_evaluated_through_their_chat_template(tmp_path, tiny_causal_lm_dir):
    """lm-eval's requests (few-shot examples as turns) and the samples carry the template's markers;
    chat_template=false and a plain model do not; chat_template=true refuses a model without one."""
    import shutil

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from refinery.tasks.eval.harness import resolve_tasks
    from refinery.tasks.eval.stage import EvalConfig, ModelSpec, evaluate

    chat_dir = tmp_path / "chat"
    shutil.copytree(tiny_causal_lm_dir, chat_dir)
    tok = AutoTokenizer.from_pretrained(chat_dir)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(chat_dir)
    (spec,) = resolve_tasks([str(EVAL_CONFIGS / "mc_local.yaml")])
    # one few-shot example (lm-eval never overrides a task file's num_fewshot: 0, so the file's is set)
    tasks = [spec.model_copy(update={"config": {**spec.config, "num_fewshot": 1}})]

    def run(mode: str, multiturn: bool = True, models=(("chat", chat_dir), ("plain", tiny_causal_lm_dir))):
        cfg = EvalConfig(models=[ModelSpec(label=lab, path=str(p)) for lab, p in models], tasks=tasks, limit=2,
                         seed=3, batch_size=4, device="cpu", prompts=["Hi"], max_new_tokens=2,
                         chat_template=mode, fewshot_as_multiturn=multiturn)
        ds = evaluate.run(tmp_path / f"work-{mode}-{multiturn}", [], cfg)
        prompts = {}
        for s in pq.read_table(Path(ds.path) / "samples" / "tasks.parquet").to_pylist():
            prompts.setdefault(s["model"], []).append(s["prompt"])
        gens = {g["model"]: g["chat"] for g in pq.read_table(Path(ds.path) / "samples" / "generations.parquet").to_pylist()}
        return ds, prompts, gens

    ds, prompts, gens = run("auto")
    assert ds.manifest["chat_template"] == {"mode": "auto", "applied": {"chat": True, "plain": False},
                                            "fewshot_as_multiturn": True}
    assert gens == {"chat": True, "plain": False}
    for p in prompts["chat"]:   # the few-shot example is a user turn answered by the assistant, then the question
        assert p.startswith("<|user|>Question:") and p.count("<|user|>") == 2 and p.endswith("<|assistant|>")
        assert p.count("<|assistant|>") == 2
    assert all("<|" not in p and p.count("Question:") == 2 for p in prompts["plain"])
    _, prompts, _ = run("auto", multiturn=False, models=(("chat", chat_dir),))
    assert all(p.count("<|user|>") == 1 and p.count("Question:") == 2 for p in prompts["chat"])
    with pytest.raises(ValueError, match="plain has no chat template"):
        run("true")


def test_a_task_file_without_its_data_says_how_to_give_it():
    from refinery.tasks.eval.harness import resolve_tasks

    with pytest.raises(ValueError, match="data_files.gsm8k_local=PATH"):
        resolve_tasks([str(EVAL_CONFIGS / "gsm8k_local.yaml")], {})
    with pytest.raises(ValueError, match="not local task files"):
        resolve_tasks([str(EVAL_CONFIGS / "mc_local.yaml")], {"nope": "x.jsonl"})


# --------------------------------------------------------------------------- lineage
def test_default_data_is_the_held_out_split_found_through_the_lineage(tmp_path, tiny_causal_lm_dir, docs_dataset):
    from refinery.tasks.eval.lineage import heldout_of
    from refinery.tasks.store import Store

    store = Store(tmp_path / "work")
    tok = store.builder("tokenize", "t1").publish(version="1", config={}, inputs=[],
                                                  extra={"holdout": {"path": docs_dataset.path}})
    b = store.builder("pretrain", "p1")
    b.put_dir(tiny_causal_lm_dir)
    pre = b.publish(version="1", config={}, inputs=[tok.ref()])
    fin = store.builder("finetune", "f1").publish(version="1", config={"model": pre.path}, inputs=[])
    assert heldout_of(fin.path) == heldout_of(pre.path) == docs_dataset.path
    assert heldout_of(str(tiny_causal_lm_dir)) is None


# --------------------------------------------------------------------------- the flow, end to end
@pytest.mark.slow
def test_refinery_run_evaluate_compares_two_models(tmp_path, tiny_causal_lm_dir, second_model_dir, docs_dataset):
    import pyarrow.parquet as pq

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    args = [REFINERY, "run", "evaluate", "--workdir", str(tmp_path / "work"),
            "--set", f"input={tiny_causal_lm_dir},{second_model_dir}", "--set", f"data={docs_dataset.path}",
            "--set", f"tasks=[{EVAL_CONFIGS / 'mc_local.yaml'}]", "--set", "limit=6", "--set", "device=cpu",
            "--set", "max_new_tokens=4", "--set", "prompts=[Once upon a time]", "--json"]
    r = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    path = Path(out["outputs"]["evaluate"])
    assert (path / "manifest.json").is_file() and (path / "chart.png").stat().st_size > 1000
    rows = pq.read_table(path / "results.parquet").to_pylist()
    labels = {r["model"] for r in rows}
    assert labels == {tiny_causal_lm_dir.name, second_model_dir.name}
    for lab in labels:
        got = {(r["task"], r["metric"]): r for r in rows if r["model"] == lab}
        bpb = got[("heldout", "bits_per_byte")]
        assert bpb["n"] == 12 and 1 < bpb["value"] < 20          # random weights: about log2(512)/bytes per token
        assert ("heldout[source=json]", "bits_per_byte") in got and ("heldout[lang=en]", "perplexity") in got
        assert got[("mc_local", "acc,none")]["n"] == 6
    values = {r["model"]: r["value"] for r in rows if (r["task"], r["metric"]) == ("heldout", "bits_per_byte")}
    assert len(set(values.values())) == 2                      # two different models, two scores
    gens = pq.read_table(path / "samples" / "generations.parquet").to_pylist()
    assert len(gens) == 2 and all(g["prompt"] == "Once upon a time" for g in gens)
    assert out["heldout"] == docs_dataset.path


# --------------------------------------------------------------------------- wiring
def test_pipeline_evaluates_each_trained_model_when_asked(monkeypatch):
    import refinery.flows.cli as cli
    from refinery.flows.pipeline import ORDER, PipelineParams, run_chain

    calls: list[tuple[str, object]] = []

    class FakeFlow:   # records what the pipeline passes; every flow's primary output is /w/NAME
        def __init__(self, name):
            self.name = name

        def run_params(self, params):
            calls.append((self.name, params))
            return {"primary": f"/w/{self.name}", "outputs": {self.name: f"/w/{self.name}"},
                    "counts": {self.name: {"n": len(calls)}}}

    monkeypatch.setattr(cli, "load_flow", FakeFlow)
    p = PipelineParams(input="crawl", data="sft.json", preferences="pairs.jsonl",
                       evaluate={"tasks": ["configs/eval/mc_local.yaml"], "limit": 3})
    out = run_chain(p, p.input, p.data, p.preferences, {**{n: getattr(p, n) for n in ORDER}, "evaluate": p.evaluate})
    assert [n for n, _ in calls] == ["curate", "tokenize", "pretrain", "evaluate", "finetune", "evaluate",
                                     "align", "evaluate"]
    evals = [params for n, params in calls if n == "evaluate"]
    assert [e.input for e in evals] == ["/w/pretrain", "/w/finetune", "/w/align"]
    assert all(e.limit == 3 and e.tasks == ["configs/eval/mc_local.yaml"] for e in evals)
    assert {k for k in out["outputs"] if k.startswith("evaluate_")} == {"evaluate_pretrain", "evaluate_finetune",
                                                                          "evaluate_align"}
    assert out["primary"] == "/w/align"
    calls.clear()
    plain = PipelineParams(input="crawl", data="sft.json")
    run_chain(plain, plain.input, plain.data, "", {**{n: getattr(plain, n) for n in ORDER}, "evaluate": None})
    assert "evaluate" not in [n for n, _ in calls]


def test_the_evaluate_deployment_follows_finetune_and_align_events():
    import yaml

    deps = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
    (ev,) = [d for d in deps if d["entrypoint"] == "refinery.flows.evaluate:evaluate_flow"]
    assert ev["name"] == "default"
    assert sorted(t["expect"][0] for t in ev["triggers"]) == ["refinery.align.completed", "refinery.finetune.completed"]
    assert all(t["parameters"]["input"] == "{{ event.payload.output }}" for t in ev["triggers"])


def test_the_demo_evaluation_section_merges_over_its_defaults():
    from refinery.flows.demo import DEMO_EVALUATE, GSM8K_TASK, DemoParams

    p = DemoParams.model_validate({"evaluate": {"limit": 3}})
    assert p.evaluate.limit == 3 and p.evaluate.gen_kwargs == DEMO_EVALUATE["gen_kwargs"]
    assert DemoParams.model_validate({"evaluate": None}).evaluate is None
    assert DemoParams().evaluate.limit == DEMO_EVALUATE["limit"] and GSM8K_TASK.is_file()


def test_generated_problems_have_gsm8k_s_answer_format(tmp_path):
    import re

    from refinery.tasks.eval.problems import write_problems

    path = write_problems(tmp_path / "p.jsonl", n=30, seed=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 30 and path.read_text() == write_problems(tmp_path / "q.jsonl", n=30, seed=1).read_text()
    for r in rows:
        m = re.search(r"#### (\-?[0-9]+)$", r["answer"])
        calc = re.search(r"<<([0-9+\-*]+)=(\-?[0-9]+)>>", r["answer"])
        assert m and calc and eval(calc.group(1)) == int(calc.group(2)) == int(m.group(1))  # noqa: S307
