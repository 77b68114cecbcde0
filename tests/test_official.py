"""MathVista's official scoring rule, case by case against the published rule worked by hand; the report with both
scores; user-supplied extractions; the prediction files other kits read; bad input named."""

import csv
import json

import pytest
from PIL import Image

from atrl.cli import main
from atrl.data.formats import load_samples, to_trl_dataset
from atrl.eval import score_responses
from atrl.eval.official import load_extractions, mathvista_normalize

MC = dict(question_type="multi_choice", answer_type="text", precision=None)

# extraction, choices, question type fields, answer, (official prediction, official right, reward right), why
CASES = [
    # multiple choice: a letter, a letter in parentheses (any case), the option's text, the nearest option
    ("B", ["3", "5", "7"], MC, "5", ("5", True, True), "letter B is the second option"),
    ("(B)", ["3", "5", "7"], MC, "5", ("5", True, True), "letter in parentheses"),
    ("(b) 5", ["3", "5", "7"], MC, "5", ("5", True, False), "parenthesised letter, upper-cased"),
    ("b", ["3", "5", "7"], MC, "5", ("3", False, True), "a bare lower-case letter is text: every option 1 edit away, "
                                                          "the first wins"),
    ("D", ["3", "5", "7"], MC, "5", ("3", False, False), "a letter past the options is text too"),
    ("", ["3", "5", "7"], MC, "5", ("3", False, False), "empty: the nearest (first shortest) option"),
    ("5", ["3", "5", "7"], MC, "5", ("5", True, True), "the option's text"),
    ("12.0", ["10", "12", "14"], MC, "12", ("10", False, True),
     "options that are numbers go by edit distance, not value: 12.0 is two edits from 10 and from 12, 10 first"),
    ("equal", ["larger than", "equal to", "smaller than"], MC, "equal to", ("equal to", True, False),
     "free text maps to its nearest option (the reward's rules refuse it)"),
    ("blue", ["red", "blue", "green"], MC, "green", ("blue", False, False), "a wrong option stays wrong"),
    # integers: str(int(float(x)))
    ("5.6", None, dict(question_type="free_form", answer_type="integer", precision=None), "5",
     ("5", True, False), "truncation: 5.6 counts as 5"),
    ("1e3", None, dict(question_type="free_form", answer_type="integer", precision=None), "1000",
     ("1000", True, True), "any float syntax"),
    ("1,000", None, dict(question_type="free_form", answer_type="integer", precision=None), "1000",
     (None, False, True), "a thousands separator is not a number"),
    ("25%", None, dict(question_type="free_form", answer_type="integer", precision=None), "25",
     (None, False, True), "nor is a percent sign"),
    ("\u22123", None, dict(question_type="free_form", answer_type="integer", precision=None), "-3",
     (None, False, True), "nor a Unicode minus"),
    ("-3", None, dict(question_type="free_form", answer_type="integer", precision=None), "-3",
     ("-3", True, True), "an ASCII minus is"),
    # floats: str(round(float(x), precision))
    ("2.54", None, dict(question_type="free_form", answer_type="float", precision=1.0), "2.5",
     ("2.5", True, True), "rounded to one decimal"),
    ("2.55", None, dict(question_type="free_form", answer_type="float", precision=1.0), "2.5",
     ("2.5", True, True), "round() of the double nearest 2.55 (2.5499...) is 2.5"),
    ("2.56", None, dict(question_type="free_form", answer_type="float", precision=1.0), "2.5",
     ("2.6", False, False), "2.6 is not 2.5"),
    ("0.333", None, dict(question_type="free_form", answer_type="float", precision=2.0), "0.33",
     ("0.33", True, True), "two decimals"),
    ("1/3", None, dict(question_type="free_form", answer_type="float", precision=2.0), "0.33",
     (None, False, True), "a fraction is not a float literal"),
    ("14.5 cm", None, dict(question_type="free_form", answer_type="float", precision=1.0), "14.5",
     (None, False, True), "nor a number with its unit"),
    # lists: the extraction as it is
    ("[1, 2, 3]", None, dict(question_type="free_form", answer_type="list", precision=None), "[1, 2, 3]",
     ("[1, 2, 3]", True, True), "the same text"),
    ("[1,2,3]", None, dict(question_type="free_form", answer_type="list", precision=None), "[1, 2, 3]",
     ("[1,2,3]", False, True), "other spacing is another string"),
]


def _row(i, extraction, choices, fields, answer, cat="math-targeted-vqa"):
    """A MathVista row as the loader writes it (its metadata holds question_type and MathVista's answer_type)."""
    kind = "choice" if fields["question_type"] == "multi_choice" else fields["answer_type"]
    meta = {"question_type": fields["question_type"], "answer_type": fields["answer_type"], "category": cat}
    return {"uid": str(i), "prompt": [{"role": "user", "content": [{"type": "text", "text": f"question {i}"}]}],
            "answer": answer, "answer_type": kind, "choices": choices or [], "precision": fields["precision"],
            "metadata": json.dumps(meta)}


@pytest.mark.parametrize("extraction, choices, fields, answer, expected, why", CASES, ids=[c[5] for c in CASES])
def test_each_case_scores_as_the_published_rule_says(extraction, choices, fields, answer, expected, why):
    prediction, right, reward_right = expected
    assert mathvista_normalize(extraction, choices, fields["question_type"], fields["answer_type"],
                               fields["precision"]) == prediction
    row = _row(0, extraction, choices, fields, answer)
    scored = score_responses([row], [f"<answer>{extraction}</answer>"])  # auto: MathVista's fields -> its rule
    assert scored.scoring == "mathvista"
    assert (scored.rows[0]["correct"], scored.rows[0]["correct_reward"]) == (right, reward_right)
    assert scored.accuracy == float(right)
    assert score_responses([row], [f"<answer>{extraction}</answer>"], scoring="reward").accuracy == reward_right


def test_the_report_gives_both_scores_and_where_they_differ():
    rows = [_row(i, *c[:4]) for i, c in enumerate(CASES)]
    responses = [f"<answer>{c[0]}</answer>" for c in CASES]
    result = score_responses(rows, responses)
    official = [c[4][1] for c in CASES]
    reward = [c[4][2] for c in CASES]
    assert result.accuracy == pytest.approx(sum(official) / len(CASES))
    assert result.other_accuracy == {"reward": pytest.approx(sum(reward) / len(CASES))}
    assert result.differ == sum(a != b for a, b in zip(official, reward)) == 11
    md = result.to_markdown()
    assert "Scoring: **mathvista**" in md and "the two rules disagree on 11 of 24 responses" in md
    assert "| 2 | 5 | (b) 5 | 5 | right | wrong |" in md  # the first differing row, with MathVista's prediction
    assert "extracts with a language model" in md  # the extraction step's difference is said
    plain = score_responses([{"uid": "s", "prompt": [], "answer": "red", "answer_type": "text"}],
                            ["<answer>red</answer>"])
    assert plain.scoring == "reward" and plain.other_accuracy == {} and "Scoring: **reward**" in plain.to_markdown()


def test_mathvista_scoring_names_the_row_and_field_it_cannot_score():
    synthetic = {"uid": "s1", "prompt": [], "answer": "red", "answer_type": "text"}
    with pytest.raises(ValueError, match=r"row 0 \(uid 's1'\): --scoring mathvista needs MathVista's fields"):
        score_responses([synthetic], ["red"], scoring="mathvista")
    no_choices = _row(3, "B", None, MC, "5")
    with pytest.raises(ValueError, match=r"row 0 \(uid '3'\): a multi_choice question without choices"):
        score_responses([no_choices], ["B"])
    no_precision = _row(4, "2.5", None, dict(question_type="free_form", answer_type="float", precision=None), "2.5")
    with pytest.raises(ValueError, match=r"row 0 \(uid '4'\): a float answer without its precision"):
        score_responses([no_precision], ["2.5"])
    with pytest.raises(ValueError, match="scoring 'official' is unknown"):
        score_responses([synthetic], ["red"], scoring="official")


def test_given_extractions_replace_the_rule_based_one_and_must_match_the_data(tmp_path):
    rows = [_row(i, *c[:4]) for i, c in enumerate(CASES[:3])]
    result = score_responses(rows, ["no answer here"] * 3, extractions={"0": "B", "1": "(B)", "2": "7"},
                             extraction_source="mine.json")
    assert [r["correct"] for r in result.rows] == [True, True, False] and result.extraction == "mine.json"
    assert [r["rule"] for r in result.rows] == ["given"] * 3 and "extractions from mine.json" in result.to_markdown()
    with pytest.raises(ValueError, match=r"--extractions x: 1 extraction\(s\) for questions the data does not have "
                                         r"\(uid '99'\)"):
        score_responses(rows, ["-"] * 3, extractions={"0": "B", "1": "B", "2": "B", "99": "B"}, extraction_source="x")
    with pytest.raises(ValueError, match=r"no extraction for row 1 \(uid '1'\) and 1 more rows"):
        score_responses(rows, ["-"] * 3, extractions={"0": "B"}, extraction_source="x")

    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"1": "B", "2": None}))
    nested = tmp_path / "mathvista_output.json"  # MathVista's own pipeline output: entries with an extraction
    nested.write_text(json.dumps({"1": {"response": "...", "extraction": "B"}}))
    lines = tmp_path / "x.jsonl"
    lines.write_text('{"pid": 1, "extraction": "B"}\n\n{"uid": "2", "extraction": "7"}\n')
    assert load_extractions(plain) == {"1": "B", "2": ""}
    assert load_extractions(nested) == {"1": "B"}
    assert load_extractions(lines) == {"1": "B", "2": "7"}
    lines.write_text('{"pid": 1, "extraction": "B"}\n{"pid": 2\n')
    with pytest.raises(ValueError, match=r"x.jsonl, line 2: not JSON"):
        load_extractions(lines)
    lines.write_text('{"pid": 1}\n')
    with pytest.raises(ValueError, match=r"line 1: needs 'pid' \(or 'uid'\) and 'extraction'"):
        load_extractions(lines)
    nested.write_text(json.dumps({"1": {"response": "..."}}))
    with pytest.raises(ValueError, match=r"entry '1': no 'extraction' field"):
        load_extractions(nested)
    plain.write_text("[1, 2]")
    with pytest.raises(ValueError, match="a JSON object keyed by question id"):
        load_extractions(plain)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_extractions(tmp_path / "missing.json")


@pytest.fixture
def testmini(tmp_path):
    """A MathVista file as the hub's testmini has it: multiple-choice answers are the option's text."""
    Image.new("RGB", (30, 30), "white").save(tmp_path / "img.png")
    data = {}
    for i, (extraction, choices, fields, answer, *_rest) in enumerate(CASES[:12]):
        data[str(i)] = {"question": f"q{i}", "query": f"q{i}", "image": "img.png", "choices": choices,
                        "unit": None, "precision": fields["precision"], "answer": answer,
                        "question_type": fields["question_type"], "answer_type": fields["answer_type"],
                        "metadata": {"category": "math-targeted-vqa", "task": "figure question answering",
                                     "skills": ["arithmetic reasoning"]}}
    path = tmp_path / "testmini.json"
    path.write_text(json.dumps(data))
    return path


def test_eval_scores_mathvista_data_by_the_official_rule_and_writes_what_other_kits_read(tmp_path, tiny_models,
                                                                                            testmini, capsys):
    from atrl.models.zoo import save_model

    model, processor = tiny_models["qwen2_5_vl"]
    save_model(model, processor, tmp_path / "ckpt")
    out = tmp_path / "ev"
    common = ["eval", "--model", str(tmp_path / "ckpt"), "--data", str(testmini), "--max-new-tokens", "4",
              "--out", str(out)]
    assert main(common) == 0
    first = json.loads((out / "eval.json").read_text())
    assert first["scoring"] == "mathvista" and first["extraction"] == "rule-based"
    assert "Scoring: **mathvista**" in (out / "eval.md").read_text()

    # rescored with given extractions (the right answers): no generation, the same responses, every row right
    samples, _ = load_samples(testmini)
    rows = to_trl_dataset(samples)
    right = {r["uid"]: r["answer"] for r in rows}
    given = tmp_path / "extractions.json"
    given.write_text(json.dumps(right))
    capsys.readouterr()
    assert main([*common, "--extractions", str(given)]) == 0
    assert "questions answered by an earlier run with the same weights and settings are not answered again" in \
        capsys.readouterr().out
    again = json.loads((out / "eval.json").read_text())
    assert [r["response"] for r in again["rows"]] == [r["response"] for r in first["rows"]]
    assert again["accuracy"] == 1.0 and again["extraction"] == str(given)

    predictions = json.loads((out / "mathvista_predictions.json").read_text())
    assert set(predictions) == {str(i) for i in range(12)}
    entry = predictions["3"]  # the bare "b": MathVista's own calculate_score.py reads these fields
    assert {"question", "query", "choices", "question_type", "answer_type", "precision", "answer", "metadata",
            "response", "extraction", "prediction", "true_false"} <= set(entry)
    assert entry["extraction"] == "5" and entry["prediction"] == "5" and entry["true_false"] is True
    assert entry["metadata"] == {"category": "math-targeted-vqa", "task": "figure question answering",
                                 "skills": ["arithmetic reasoning"]}
    with (out / "vlmevalkit_MathVista.tsv").open(newline="") as fh:
        table = list(csv.DictReader(fh, delimiter="\t"))
    assert len(table) == 12 and table[0]["answer_option"] == "B" and table[0]["choices"] == "['3', '5', '7']"
    assert table[10]["question_type"] == "free_form" and table[10]["answer_option"] == ""
    assert table[0]["skills"] == "['arithmetic reasoning']" and table[0]["prediction"] == first["rows"][0]["response"]

    capsys.readouterr()
    assert main([*common, "--scoring", "reward"]) == 0
    assert json.loads((out / "eval.json").read_text())["scoring"] == "reward"
    assert main([*common, "--extractions", str(tmp_path / "nope.json")]) == 2
    assert "--extractions" in capsys.readouterr().err
