"""The safety guard's notice text: fixed, written here, never produced by the model (``build_notice`` in
:mod:`medlora.safety` puts it together; a category's extra line comes from its entry in ``red_flags.py``)."""

NOTICE_HEADER = "⚠ EMERGENCY NOTICE (medlora safety guard)"
DEFAULT_EMERGENCY_NUMBER = (
    "your local emergency number (for example 911 in the US and Canada, 112 in the EU, "
    "999 in the UK)"
)
NOTICE_SIGNS = "Your message mentions signs that can be a medical emergency ({labels})."
NOTICE_CALL = (
    "Call {number} now, or go to the nearest emergency department. "
    "Do not wait for an answer here."
)
CRISIS_LINE = (
    "If you are thinking about harming yourself, call or text a crisis line now: 988 in "
    "the US, or {number}; you are not alone."
)
POISON_CONTROL = (
    "For a possible poisoning or overdose you can also call a poison control centre "
    "(1-800-222-1222 in the US), but if the person is hard to wake, having a seizure or "
    "struggling to breathe, call {number} first."
)
NOTICE_FOOTER = (
    "The rest of this reply is general information from an AI model, not medical advice."
)
