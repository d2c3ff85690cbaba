"""The rule-based red-flag guard (medlora.safety): recall on hand-written emergencies,
false alarms on hand-written look-alike controls and on MedQuAD questions, and the
fixed emergency notice. Fast; no model."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from medlora import safety
from medlora.safety import GuardResult, check, detect, format_answer

ROOT = Path(__file__).resolve().parents[1]
SAFETY_DIR = ROOT / "data" / "safety"
MEDQUAD_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medquad.csv"
SRC_DIR = ROOT / "src" / "medlora"


def _rows(name: str) -> list[dict[str, str]]:
    with open(SAFETY_DIR / name, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def red_flags() -> list[dict[str, str]]:
    return _rows("red_flags.csv")


@pytest.fixture(scope="module")
def controls() -> list[dict[str, str]]:
    return _rows("controls.csv")


def test_data_sets_have_the_promised_shape(red_flags, controls):
    assert len(red_flags) >= 80
    per_category = Counter(r["category"] for r in red_flags)
    assert len(per_category) >= 12, per_category
    assert min(per_category.values()) >= 5, per_category
    assert set(per_category) <= {f.category for f in safety.RED_FLAGS}, "unknown category slug"
    assert len(controls) >= 80
    lookalikes = [r for r in controls if r["category"] != "general"]
    assert len(lookalikes) >= 40
    for rows in (red_flags, controls):
        questions = [r["question"].strip() for r in rows]
        assert all(questions), "empty question"
        assert len(set(questions)) == len(questions), "duplicate question"
    assert not {r["question"] for r in red_flags} & {r["question"] for r in controls}


def test_recall_on_red_flags(red_flags):
    misses = [f'{r["category"]}: {r["question"]}' for r in red_flags if not detect(r["question"])]
    recall = 1 - len(misses) / len(red_flags)
    print(f"red-flag recall {recall:.3f} ({len(red_flags) - len(misses)}/{len(red_flags)})")
    assert recall >= 0.95, "missed:\n" + "\n".join(misses)


def test_red_flags_land_in_their_own_category(red_flags):
    wrong = [f'{r["category"]} -> {detect(r["question"])}: {r["question"]}'
             for r in red_flags if r["category"] not in detect(r["question"])]
    assert len(wrong) / len(red_flags) <= 0.05, "wrong category:\n" + "\n".join(wrong)


def test_false_alarms_on_controls(controls):
    alarms = [f'{r["category"]} -> {detect(r["question"])}: {r["question"]}'
              for r in controls if detect(r["question"])]
    rate = len(alarms) / len(controls)
    print(f"controls false-alarm rate {rate:.3f} ({len(alarms)}/{len(controls)})")
    assert rate <= 0.02, "false alarms:\n" + "\n".join(alarms)


def test_false_alarms_on_medquad_questions():
    if not MEDQUAD_CSV.is_file():
        pytest.skip(f"{MEDQUAD_CSV} not present")
    import pandas as pd

    questions = pd.read_csv(MEDQUAD_CSV, dtype=str, keep_default_na=False)["Question"].tolist()
    alarms = [f"{detect(q)}: {q}" for q in questions if detect(q)]
    rate = len(alarms) / len(questions)
    print(f"MedQuAD false-alarm rate {rate:.4f} ({len(alarms)}/{len(questions)})")
    assert rate <= 0.01, f"{len(alarms)} false alarms, first 30:\n" + "\n".join(alarms[:30])


@pytest.mark.parametrize("message, category", [
    ("i think i'm having a heart attack", "chest_pain"),
    ("my arm is numb and i have crushing chest pain", "chest_pain"),
    ("My dad’s face looks droopy on one side and he’s talking funny", "stroke"),
    ("took the whole bottle of my sleeping pills", "overdose_poisoning"),
    ("i dont want to be here anymore", "self_harm"),
    ("I can NOT   breathe", "breathing"),
])
def test_examples_fire(message, category):
    assert category in detect(message)


@pytest.mark.parametrize("message", [
    "what is the recovery time after a heart attack",
    "what are the symptoms of a stroke",
    "What are the symptoms of Anaphylaxis ?",
    "this headache is killing me, what can i take",
    "i cant breathe through my nose because of a cold",
    "",
    "   ",
])
def test_educational_and_harmless_messages_do_not_fire(message):
    assert detect(message) == []
    assert check(message) == GuardResult([], None)


def test_detect_order_is_stable():
    message = "my wife is pregnant and just had a seizure"
    order = [f.category for f in safety.RED_FLAGS]
    found = detect(message)
    assert found == sorted(found, key=order.index)
    assert {"pregnancy", "seizure"} <= set(found)
    assert detect(message) == found


def test_notice_default_numbers():
    result = check("i think im having a heart attack")
    assert result.categories == ["chest_pain"]
    notice = result.notice
    assert notice.startswith("⚠ EMERGENCY NOTICE (medlora safety guard)")
    for number in ("911", "112", "999"):
        assert number in notice
    assert "emergency department" in notice
    assert notice.rstrip().endswith("not medical advice.")
    assert "988" not in notice and "poison" not in notice.lower()


def test_notice_custom_emergency_number():
    notice = check("my baby is choking", emergency_number="000").notice
    assert "call 000 now" in notice.lower()
    assert "911" not in notice and "112" not in notice and "999" not in notice


def test_crisis_line_only_for_self_harm():
    self_harm = check("i want to kill myself")
    assert self_harm.categories == ["self_harm"]
    assert "crisis line" in self_harm.notice and "988" in self_harm.notice
    for message in ("my dad collapsed and isnt breathing", "i'm throwing up blood",
                    "my toddler drank some bleach"):
        notice = check(message).notice
        assert notice and "crisis line" not in notice and "988" not in notice
    assert "crisis line" in check("i want to die", emergency_number="000").notice


def test_poison_control_for_overdose():
    notice = check("my toddler drank some bleach what do i do").notice
    assert "poison control" in notice.lower()


def test_one_notice_for_several_categories():
    message = ("took the whole bottle of my pills because i want to die and now "
               "my chest hurts and i cant breathe")
    result = check(message)
    assert {"self_harm", "overdose_poisoning", "chest_pain", "breathing"} <= set(result.categories)
    notice = result.notice
    assert notice.count("EMERGENCY NOTICE") == 1
    assert notice.count("crisis line") == 1
    assert notice.lower().count("poison control") == 1
    assert notice.count("not medical advice") == 1


def test_format_answer():
    notice = check("i want to kill myself").notice
    assert format_answer(notice, "Answer.") == f"{notice}\n\nAnswer."
    assert format_answer(None, "Answer.") == "Answer."


def test_notice_and_patterns_live_only_in_safety_module():
    # substrings of the notice text and of the pattern source that nothing else should carry
    distinctive = ["EMERGENCY NOTICE", "medlora safety guard", "call or text a crisis line now",
                   r"kil+(?:ing)?", r"(?:heart|hart) ?at+a?c?k"]
    offenders = []
    for path in sorted(SRC_DIR.rglob("*.py")):
        if path.parent.name == "safety":
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(ROOT)}: {s!r}" for s in distinctive if s in text]
    assert not offenders, "guard text or patterns outside medlora/safety/:\n" + "\n".join(offenders)
    safety_text = "".join(p.read_text(encoding="utf-8") for p in (SRC_DIR / "safety").glob("*.py"))
    assert all(s in safety_text for s in distinctive)
