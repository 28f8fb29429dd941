"""A benchmark task file is data: nothing in it runs code. lm-eval renders task templates with an
unsandboxed Jinja environment and loads unknown metric names as scripts; we refuse such files
when they are read (before any model loads) and render templates in jinja2's sandbox."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

PAYLOADS = [
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ cycler['__init__']['__globals__']['os'].system('touch MARKER') }}",
    "{{ (cycler|attr('__init__')|attr('__globals__'))['os'].system('touch MARKER') }}",
]


def task_file(tmp_path: Path, **fields) -> Path:
    (tmp_path / "data.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    config = {"task": "probe", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "data.jsonl"}},
              "test_split": "test", "output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:",
              "doc_to_target": "{{answer}}", "metric_list": [{"metric": "exact_match"}], **fields}
    path = tmp_path / "probe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_template_reaching_python_internals_is_refused_when_read(tmp_path, monkeypatch, payload):
    from refinery.tasks.eval.harness import load_task_file

    monkeypatch.chdir(tmp_path)
    path = task_file(tmp_path, doc_to_text=payload)
    with pytest.raises(ValueError, match=f"{path}.*internal attribute.*never code"):
        load_task_file(str(path))
    assert not (tmp_path / "MARKER").exists()


def test_a_metric_lm_eval_would_load_as_a_script_is_refused(tmp_path):
    from refinery.tasks.eval.harness import load_task_file

    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "evil.py").write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w')\n")
    for entry in ({"metric": str(tmp_path / "evil")}, {"metric": "exact_match", "hf_evaluate": True}):
        with pytest.raises(ValueError, match="metric .*never code"):
            load_task_file(str(task_file(tmp_path, metric_list=[entry])))
    assert not (tmp_path / "MARKER").exists()
    assert load_task_file(str(task_file(tmp_path))).name == "probe"   # the ordinary file still loads


@pytest.mark.parametrize("payload", PAYLOADS)
def test_templates_render_in_a_sandbox(tmp_path, monkeypatch, payload):
    """Defence in depth: whatever reaches lm-eval's renderer runs sandboxed; ordinary templates and
    lm-eval's own filter still render."""
    import lm_eval.utils
    from jinja2.exceptions import SecurityError, UndefinedError

    from refinery.tasks.eval.harness import sandbox_templates

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lm_eval.utils, "env", lm_eval.utils.env)   # restored after the test
    sandbox_templates()
    with pytest.raises((SecurityError, UndefinedError)):   # the sandbox refuses, or hides the attribute
        lm_eval.utils.apply_template(payload, {})
    assert not (tmp_path / "MARKER").exists()
    assert lm_eval.utils.apply_template("Q: {{ q|regex_replace('a', 'b') }}\n", {"q": "aa"}) == "Q: bb\n"
