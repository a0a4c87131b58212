import pytest

from kvshrink.eval import metrics as M


def test_normalize_answer():
    assert M.normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"
    assert M.normalize_answer("an apple-pie") == "applepie"


def test_qa_f1_hand_computed():
    # pred tokens: cat sat mat ; gold: cat sat on hat -> common 2, p=2/3, r=2/4, f1=2*(2/3*1/2)/(2/3+1/2)=4/7
    assert M.qa_f1("The cat sat mat.", "cat sat on the hat") == pytest.approx(4 / 7)
    assert M.qa_f1("nothing", "cat") == 0.0
    assert M.qa_f1("Paris", "paris") == 1.0


def test_longbench_rouge_l_hand_computed():
    # one sentence each; LCS(words) of "a b c d" and "a c e d" = a c d (3); unique words m=4, n=4 -> f=0.75
    assert M.longbench_rouge_l("a c e d", "a b c d") == pytest.approx(0.75, abs=1e-6)
    # two hypothesis sentences: union LCS with reference "w1 w2 w3 w4 w5" is {w1 w2 w3 w5}: r=4/5, p=4/8 (unique)
    s = M.longbench_rouge_l("w1 w2 w6 w7 w8. w1 w3 w8 w9 w5", "w1 w2 w3 w4 w5")
    r, p = 4 / 5, 4 / 8
    assert s == pytest.approx(2 * p * r / (p + r), abs=1e-6)
    assert M.longbench_rouge_l("", "a b") == 0.0
    assert M.longbench_rouge_l("...", "a b") == 0.0


def test_rouge_l_rouge_score_package():
    assert M.rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert M.rouge_l("a b c d", "a c e d") == pytest.approx(0.75)


def test_count_and_retrieval():
    assert M.count("There are 5 paragraphs, not 3 or 5", "5") == pytest.approx(2 / 3)
    assert M.count("no numbers", "5") == 0.0
    assert M.retrieval("Paragraph 12", "Paragraph 12") == 1.0
    assert M.retrieval("Paragraph 3 or 12", "Paragraph 12") == 0.5
    assert M.retrieval_zh("段落4", "段落4") == 1.0


def test_code_sim_first_clean_line():
    pred = "```python\n# comment\nx = foo(1)\nmore"
    assert M.code_sim(pred, "x = foo(1)") == 1.0
    assert M.code_sim("abcd", "abce") == pytest.approx(0.75)  # SequenceMatcher: 2*3/8
    assert M.code_sim("", "x") == 0.0


def test_classification():
    classes = ["Location", "Abbreviation", "Entity", "Description"]
    assert M.classification("Location", "Location", all_classes=classes) == 1.0
    assert M.classification("Location or Entity", "Entity", all_classes=classes) == 0.5
    assert M.classification("Nothing", "Entity", all_classes=classes) == 0.0
    # a match that is a substring of the gold class is dropped
    assert M.classification("Food and Food item", "Food item", all_classes=["Food", "Food item"]) == 1.0


def test_score_first_line_and_max_over_references():
    meta = {"first_line": True}
    assert M.score("qa_f1", "\nParis\nLondon", ["London"], meta) == 0.0
    assert M.score("qa_f1", "Paris\nLondon", ["London", "Paris"], meta) == 1.0
    assert M.score("qa_f1", "x", [], {}) is None
    assert M.score("none", "x", ["x"], {}) is None
    assert M.score("contains", "The number is 1234567.", ["1234567"]) == 1.0
    assert M.score("string_match", "value: 123456", ["123456"]) == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        M.score("nope", "x", ["x"])
