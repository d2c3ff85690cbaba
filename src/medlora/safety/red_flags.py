"""The safety guard's red-flag table: each emergency category, its label, its rules and its extra notice line.

Data only: :mod:`medlora.safety` normalises a message (lowercase, no apostrophes, "can not" -> "cant") and
matches it against these rules. A rule's regexes must all match; ``_ctx`` rules fire only when the message is
also about a real person right now (``safety.CONTEXT_PATTERNS``), ``_alone`` rules in any framing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .notice import CRISIS_LINE, POISON_CONTROL

_CHEST = r"(?:chest|chset|chets|chestt|ches)"
_BELLY = r"(?:stomach|stomache|stomch|belly|abdomen|abdominal|tummy|gut)"
_SEIZ = r"(?:seizures?|seizing|siezures?|siezing|sezures?|seisures?|fits?|fitting|convulsions?|convulsing)"
_HEART_ATTACK = r"(?:heart|hart) ?at+a?c?k"  # "heart attack", "heartattack", "hart attack", "heart atack"
_SUDDEN = (
    r"\b(?:sudden|suddenly|all of a sudden|out of nowhere|out of the blue|just now|"
    r"minutes? ago|mins? ago|an hour ago|one side|half)\b"
)
_SEVERE = (
    r"\b(?:really|very|so|bad|badly|worse|worsening|severe|cant|wont|barely|blue|"
    r"not helping|isnt helping|isnt working|sudden|suddenly)\b"
)
_DRUG = (
    r"(?:pills?|tablets?|tabs|capsules?|caps|meds|medicines?|medications?|tylenol|"
    r"paracetamol|acetaminophen|ibuprofen|advil|aspirin|xanax|valium|benzos?|oxy\w*|"
    r"percocet|opioids?|fentanyl|antidepressants?|insulin|gummies)"
)
_POISON = (
    r"(?:bleach|detergent|(?:laundry |dishwasher |washing |tide )?pods?|antifreeze|"
    r"(?:button )?batter(?:y|ies)|magnets?|drain cleaner|oven cleaner|"
    r"cleaning (?:product|fluid|liquid|spray)s?|(?:rat |mouse )?poison|weed ?killer|"
    r"pesticides?|insecticides?|lighter fluid|gasoline|petrol|lamp oil|paraffin|kerosene|"
    r"wild mushrooms?|poisonous \w+|nail polish remover|e liquid|vape (?:juice|liquid)|"
    r"chemicals?|mouthwash|hand saniti[sz]er|bleech|(?:windshield |windscreen )?washer fluid|methanol|"
    r"(?:weed |thc |cannabis )?edibles?|(?:weed|thc|cannabis) gumm(?:y|ies))"
)
_BREATHLESS = (
    r"(?:short(?:ness)? of breath|breathless\w*|out of breath|"
    r"cant (?:catch|get) (?:my|his|her|their|a) breath|"
    r"(?:hurts|painful|pain|hard|difficult) (?:to|when (?:i |he |she |they )?)breath\w*|"
    r"chest pain|pain in (?:my |his |her |their |the )?chest|"
    r"cough\w* (?:up )?blood|heart (?:is )?(?:racing|pounding)|racing heart|"
    r"pass(?:ed)? out|faint\w*)"
)
_NOT_A_BLOOD_TEST = r"(?! (?:test|tests|pressure|sugar|work|count|type|results?|donation|draw))"


@dataclass(frozen=True)
class Rule:
    """All regexes in ``all_of`` must match; with ``needs_context`` the message must
    also match one of ``safety.CONTEXT_PATTERNS``."""

    all_of: tuple[re.Pattern[str], ...]
    needs_context: bool = True


@dataclass(frozen=True)
class RedFlag:
    """One emergency category: slug, human label, rules, and an extra notice line."""

    category: str
    label: str
    rules: tuple[Rule, ...]
    #: Extra line for the notice (formatted with ``number=``), or None for the
    #: standard "call the emergency number / go to the emergency department" only.
    advice: str | None = None


def _ctx(*regexes: str) -> Rule:
    """Rule that fires when every regex matches and the message has personal context."""
    return Rule(tuple(re.compile(r) for r in regexes), needs_context=True)


def _alone(*regexes: str) -> Rule:
    """Rule for phrases that are urgent in any framing: fires without context."""
    return Rule(tuple(re.compile(r) for r in regexes), needs_context=False)


# --------------------------------------------------------------------------------------
# The categories, in the order detect() reports them
# --------------------------------------------------------------------------------------

RED_FLAGS: tuple[RedFlag, ...] = (
    # Unambiguous phrases fire alone; "this headache is killing me" and "dying to know"
    # match nothing.
    RedFlag(
        "self_harm",
        "thoughts of suicide or self-harm",
        advice=CRISIS_LINE,
        rules=(
            _alone(r"\bkil+(?:ing)? (?:my ?self|myself)\b"),
            _alone(r"\b(?:hang|hanging|shoot|shooting|stab|stabbing|drown|drowning|starve|starving|"
                   r"poison|poisoning|unalive|unaliving) ?my ?self\b|\bunalive\b"),
            _alone(r"(?<!\d)(?<!\d )\bkms\b(?! (?:away|from|per|an hour|a day|to|of|on|in|north|south|east|west))"),
            _alone(r"\b(?:painless|easiest|easy|quickest|quick|fastest|best|surest|least painful) ways? to "
                   r"(?:die|kill (?:my ?self|yourself|oneself)|end (?:it|my life|your life)|commit suicide)\b"),
            _alone(r"\bhow (?:many|much)\b.{0,40}\b(?:to die|kill (?:me|myself|a person|someone)|"
                   r"(?:to )?(?:not|never) wake up)\b"),
            _alone(r"\b(?:nothing|no one|nobody|noone) (?:left )?to live for\b|\brather be dead\b"),
            _alone(r"\b(?:going to|gonna|will|want to|planning to|about to) (?:take|swallow) (?:all|every one) "
                   rf"(?:of )?(?:my|the|his|her) (?:\w+ )?{_DRUG}"),
            _alone(r"\b(?:overdos\w*|od)\b.{0,30}\b(?:on purpose|intentionally|deliberately|to die|to end it)\b"),
            _alone(r"\b(?:suicide|goodbye) (?:note|notes|letter|letters)\b"),
            _alone(r"\b(?:end|ending|take|taking) (?:my (?:own )?life|it all)\b"),
            _alone(r"\bbetter off (?:without me|dead|if i (?:was|were) (?:dead|gone))"),
            _alone(r"\b(?:dont|doesnt) want to (?:be here|live|be alive|exist|go on)\b"),
            _alone(r"\bwish (?:i|he|she) (?:was|were|could be) dead\b"),
            _ctx(
                r"(?<!like im )(?<!like hes )(?<!like shes )(?<!like i am )"  # "feel like im going to die": dread
                r"\b(?:want|wants|wanna|wanted|wish|wishes|wishing|going|gonna|ready|plan"
                r"|planning) (?:to )?(?:die|be dead|not be alive|not exist|not wake up)\b"
                r"(?! (?:my|her|his|their|your|the) hair)"
            ),
            _ctx(r"\b(?:suicid\w*|sucid\w*|suicd\w*|suiside\w*|sucide\w*)"),
            _ctx(r"\b(?:cut|cutting|burn|burning) (?:my ?self|myself)\b"
                 r"(?! (?:shaving|cooking|chopping|on|while|by accident|accidentally|"
                 r"with a (?:kitchen )?knife while))"),
            _ctx(r"\bjump\w* (?:off|from|in front of)\b.{0,25}\b(?:bridge|building|roof|balcony|cliff|train|"
                 r"car|bus|tower|window|overpass|ledge)"),
            _ctx(r"\b(?:not|isnt|no longer|aint) worth living\b|\bdone with (?:life|living|it all)\b|"
                 r"\b(?:i|we) should (?:just )?(?:die|be dead)\b(?! (?:my|her|his|the|their) hair)|"
                 r"\b(?:want|wanna|wish i could|going|gonna|wish to) (?:to )?(?:just )?(?:disappear|sleep) forever\b|"
                 r"\b(?:dont|doesnt) want to wake up\b(?! (?:early|so early|at|for|before|in the|during|every|when|"
                 r"because|on|my|his|her|him|them|the|everyone|anyone|with)\b)|"
                 r"\bvoices? (?:telling|tell|told|tells) (?:me|him|her|them) to (?:die\b|(?:kill|hurt|harm) "
                 r"(?:my|him|her|them)sel(?:f|ves)\b)"),
            _ctx(r"\b(?:i|im|ive|been|keep|keeps|started|still|is|hes|shes|are|was) (?:\w+ )?"
                 r"self harm\w*|\b(?:cutting|hurting|harming) (?:my|him|her|them)sel(?:f|ves)\b"),
            _ctx(r"\bcant go on\b(?: anymore| any more| like this| living|$|[.,!])"),
            _ctx(r"\b(?:no|whats the|what is the) (?:point|reason) (?:in |of |to )?"
                 r"(?:living|live|life|going on|being alive|carrying on)\b"),
            _ctx(r"\bwant (?:it all|everything|it) to (?:stop|end)\b"),
        ),
    ),
    RedFlag(
        "overdose_poisoning",
        "overdose or poisoning",
        advice=POISON_CONTROL,
        rules=(
            _alone(r"\b(?:took|taken|take|swallowed|ate|eaten|drank|had|downed|popped) "
                   r"(?:the |a |my |his |her |an )?(?:whole|entire|full|rest of (?:the|my|his|her)) "
                   r"(?:bottle|pack|packet|box|blister|strip|supply)"),
            _alone(rf"\b(?:took|taken|swallowed|ate|eaten) all (?:of )?(?:my|his|her|the|their) "
                   rf"(?:\w+ )?{_DRUG}"),
            _alone(rf"\b(?:took|taken|swallowed|ate|eaten|downed|drank) (?:a|an|half a|half the|"
                   rf"most of (?:a|the|my|his|her)) (?:\w+ )?(?:bottle|pack|packet|box|blister|strip)"
                   rf" of (?:\w+ )?{_DRUG}"),
            # "took like 20 tylenol", "took too many pills", "took a bunch of xanax"
            _ctx(rf"\b(?:took|taken|swallowed|ate|eaten|had|popped|downed)\b.{{0,20}}"
                 rf"\b(?:too many|a (?:bunch|handful|load|lot)|loads|lots|"
                 rf"[1-9]\d{{1,2}}(?!\d| ?(?:years?|yrs?|months?|weeks?|days?|hours?|hrs?|mins?|minutes?|"
                 rf"times|mg|mcg|ml|%))|ten|twenty|thirty|forty|fifty)\b.{{0,25}}\b{_DRUG}\b"),
            _ctx(r"\boverdos\w*|\bod(?:d|ed|ing)\b"),
            _ctx(rf"\b(?:drank|drunk|drink|drinking|swallowed|swallow|swallowing|ate|eaten|"
                 rf"eating|bit|bitten|biting|chewed|chewing|licked|sucked|got into|into|"
                 rf"inhaled|sprayed)\b.{{0,30}}\b{_POISON}\b"),
            # a child who got into someone's medicine
            _ctx(rf"\b(?:ate|eaten|eat|swallowed|chewed|got into|into)\b.{{0,30}}\b{_DRUG}\b",
                 r"\b(?:son|daughter|kid|kids|child|toddler|baby|boy|girl)\b|"
                 r"\b\d+ (?:year|yr|month) old\b"),
            _ctx(rf"\b(?:took|taken|swallowed|ate|eaten|given|gave)\b.{{0,30}}\b{_DRUG}\b.{{0,30}}"
                 r"\b(?:by mistake|by accident|accidentally|not (?:his|hers|theirs|mine))\b"),
            _ctx(r"(?<!food )\bpoisoned\b"),
            _ctx(r"\b(?:took|taken|gave|given|had|swallowed)\b.{0,25}\b(?:double|triple|twice|wrong)\b.{0,10}"
                 r"\b(?:dose|doses|dosage|amount|pills?|meds)\b"),
            _ctx(r"\b(?:drank|downed|drunk|finished)\b.{0,30}\b(?:bottle|fifth|litre|liter|handle|whole|lot)\b"
                 r".{0,20}\b(?:vodka|whisky|whiskey|rum|gin|tequila|alcohol|liquor|spirits)\b",
                 r"\b(?:pass\w* out|unconscious|wont wake|cant wake|vomit\w*|throw\w* up|threw up|puk\w*|"
                 r"breath\w*|blue|cold)\b"),
            _ctx(r"\b(?:bit|bitten|stung) by (?:a |an )?(?:\w+ )?(?:snake|rattlesnake|rattler|viper|adder|cobra|"
                 r"copperhead|cottonmouth|black widow|brown recluse|funnel web|scorpion|stonefish|jellyfish)\b|"
                 r"\b(?:snake|rattlesnake|rattler|viper|adder|cobra|copperhead) bit(?:e)?\b"),
            _ctx(r"\bcarbon monoxide\b|\bco (?:alarm|detector)\b",
                 r"\b(?:alarm|detector|going off|beeping|dizzy|headache|sick|nause\w*|faint\w*|"
                 r"confus\w*|drowsy|pass\w* out|collapsed)\b"),
            _ctx(rf"\b(?:mixed|mixing|with)\b.{{0,20}}\b(?:alcohol|vodka|beer|wine|drinks?)\b",
                 rf"\b(?:took|taken|swallowed|popped|had)\b.{{0,30}}\b{_DRUG}\b",
                 r"\b(?:wont|cant|not|isnt|barely|hardly) (?:wake|respond\w*|breath\w*)"),
        ),
    ),
    RedFlag(
        "chest_pain",
        "chest pain or a possible heart attack",
        rules=(
            _ctx(rf"\bhaving (?:a |another )?{_HEART_ATTACK}\b"),
            _ctx(r"\b(?:think|thinks|thought|feels? like|might be|may be|could be)\b"
                 rf".{{0,30}}\b{_HEART_ATTACK}\b"),
            _ctx(rf"\b(?:heavy|heaviness|tight|tightness|pressure|crushing|squeezing)\b.{{0,25}}\b{_CHEST}\b"),
            _ctx(r"\b(?:left )?arm\b.{0,30}\bjaw\b|\bjaw\b.{0,30}\b(?:left )?arm\b",
                 r"\b(?:pain|hurts?|ache|aching|sweat\w*|clammy|faint\w*|pass out|sick)\b"),
            _ctx(r"\bmy heart (?:hurts|is hurting|aches|pains)\b|\b(?:tearing|ripping) (?:pain|feeling)\b"),
            _ctx(r"\bheart (?:is )?(?:racing|pounding|beating (?:so |really |very )?fast)\b|"
                 r"\b(?:1[5-9]\d|2\d\d) ?bpm\b",
                 r"\b(?:faint\w*|pass\w* out|passing out|dizzy|lightheaded|light headed|chest|short of breath)\b"),
            _ctx(rf"\b{_CHEST}\b.{{0,25}}\b(?:pain|pains|pian|hurt|hurts|hurst|hurting|pressure|tight|"
                 rf"tightness|crush\w*|squeez\w*|heav\w*|elephant|weight|ache|aching)\b"),
            _ctx(rf"\b(?:pain|pains|pressure|tightness|heaviness|crushing|squeezing)\b"
                 rf".{{0,15}}\bin (?:the |my |his |her |their )?{_CHEST}\b"),
            _ctx(rf"\bclutch\w* (?:at )?(?:his|her|my|their|the) {_CHEST}\b"),
        ),
    ),
    RedFlag(
        "stroke",
        "a possible stroke",
        rules=(
            _ctx(r"\bhaving (?:a |another )?(?:stroke|stoke)\b"),
            _ctx(r"\b(?:numb\w*|weak\w*|tingl\w*|paraly\w*|no feeling)\b.{0,25}\b(?:arm|leg|face|side|hand)\b",
                 _SUDDEN),
            _ctx(r"\b(?:lost (?:\w+ ){0,2}(?:vision|sight)|blind in (?:one|my|his|her|the) (?:\w+ )?eye|"
                 r"(?:vision|sight) (?:went|going|turned|has gone) (?:black|dark|blurry|out)|"
                 r"curtain (?:coming |came |falling |fell )?(?:down )?over)",
                 _SUDDEN + r"|\bcurtain\b|\bone eye\b"),
            _ctx(r"\bcant (?:walk straight|stand up straight|keep (?:his|her|my|their) balance)\b|"
                 r"\b(?:stumbling|staggering|lost (?:his|her|my|their) balance)\b", _SUDDEN),
            _ctx(r"\b(?:think|thinks|might be|may be|could be|looks like)\b.{0,30}\bstroke\b"),
            _ctx(r"\b(?:face|mouth|smile|lips?|eye)\b.{0,25}\bdroop\w*|"
                 r"\bdroop\w*\b.{0,25}\b(?:face|mouth|smile|lips?|one side)\b"),
            _ctx(r"\bslurr\w*"),
            _ctx(r"\b(?:talking|speaking|speech|talks|sounds|words)\b.{0,15}\b(?:funny|weird|"
                 r"strange|odd|garbled|jumbled|wrong|gibberish|mixed up)\b"),
            _ctx(r"\bcant (?:speak|talk)\b", _SUDDEN + r"|\b(?:properly|clearly|right)\b"),
            _ctx(r"\b(?:cant|doesnt|dont|isnt) understand(?:ing)? (?:what|me|anything|us|words)\b", _SUDDEN),
            _ctx(r"\bcant (?:move|lift|feel|use|raise)\b.{0,20}\b(?:arm|leg|hand|face|side)\b"),
            _ctx(r"\b(?:face|arm|leg|hand|side)\b.{0,20}\b(?:numb|weak|limp|dead)\b", _SUDDEN),
            _ctx(r"\b(?:sudden|suddenly)\b.{0,30}\b(?:blind|lost (?:my|his|her) vision|cant see)\b"),
        ),
    ),
    RedFlag(
        "breathing",
        "severe trouble breathing",
        rules=(
            _ctx(r"\bcant (?:breath|breathe|breathing|get (?:a |my |his |her |their )?breath|"
                 r"catch (?:my|his|her|their|a) breath)\b"
                 r"(?! (?:through|thru|out of|from|in through) (?:my|his|her|the|their) nose)"),
            _ctx(r"\b(?:turn\w*|going|gone|went) (?:blue|grey|gray)\b|\bblue lips\b|"
                 r"\blips (?:are |look |is |turning )?(?:blue|grey|gray)\b"),
            _ctx(r"\bgasp\w* for (?:air|breath)"),
            _ctx(r"\b(?:struggl\w*|fight\w*|battl\w*) (?:to|for) (?:breath\w*|air)\b"),
            _ctx(r"\b(?:trouble|difficulty|difficult|hard time|problems?) breath\w*", _SEVERE),
            _ctx(r"\bcant (?:finish|complete|say) (?:a )?(?:full )?sentence|"
                 r"\bcan barely (?:talk|speak|breath\w*)\b|\bbarely breath\w*"),
            _ctx(r"\binhaler\b.{0,25}\b(?:isnt|not|doesnt|didnt|wont|no longer) (?:work\w*|help\w*)"),
            _ctx(r"\bribs?\b.{0,20}\b(?:suck\w*|pull\w*) in\b|\bsucking in\b|\bcaving in\b"),
            _ctx(r"\bbreath\w* (?:is |are )?(?:really |very |so |super )?(?:fast|rapid|quick|"
                 r"hard|shallow|weird|funny|noisy)\b",
                 r"\b(?:baby|infant|newborn|toddler|child|son|daughter|kid|he|she|hes|shes)\b"),
            _ctx(r"\b(?:short(?:ness)? of breath|breathless|out of breath)\b",
                 r"\b(?:sudden|suddenly|at rest|sitting|lying|resting|worse|severe|really bad|"
                 r"blue|cant talk|cant speak)\b"),
        ),
    ),
    RedFlag(
        "anaphylaxis",
        "a severe allergic reaction",
        rules=(
            _ctx(r"\bthroat\b.{0,20}\b(?:clos\w*|tight\w*|swell\w*|swollen)"),
            _ctx(r"\b(?:tongue|lips?|mouth)\b.{0,20}\b(?:swell\w*|swollen|puff\w*)\b|"
                 r"\bswell\w* (?:of |in |up )?(?:my |his |her |their |the )?(?:tongue|lips?|throat)"),
            _ctx(r"\b(?:face|eyes?)\b.{0,20}\b(?:swell\w*|swollen|puff\w*)",
                 r"\b(?:allerg\w*|sting|stung|bee|wasp|hornet|peanuts?|nuts?|shellfish|shrimp|"
                 r"prawns?|hives|reaction|epi ?pens?|antibiotics?|amoxicillin|penicillin)\b"),
            _ctx(r"\b(?:used|gave|injected|had to use|needed) (?:\w+ )?epi ?pens?\b"),
            _ctx(r"\bhives\b", r"\b(?:throat|breath\w*|tongue|lips?|wheez\w*|swell\w*|dizzy|faint\w*)\b"),
            _ctx(r"\b(?:having|going into|in) (?:an? )?(?:bad |severe |serious )?"
                 r"(?:allergic reaction|anaphyla\w*)"),
            _ctx(r"\banaphylactic shock\b"),
        ),
    ),
    RedFlag(
        "choking",
        "choking",
        rules=(
            _ctx(r"(?<!from )\bchoking\b(?! hazards?| risks?)"),
            _ctx(r"\bchoked\b",
                 r"\b(?:cant|no sound|not breathing|blue|wont|silent|gasping|not making|still)\b"),
            _ctx(r"\b(?:stuck|lodged) in (?:my|his|her|their|the) (?:throat|windpipe|airway)\b",
                 r"\b(?:cant|unable to|not|no) (?:breath\w*|cough\w*|talk|speak|swallow)|"
                 r"\bblue\b|\bgasping\b|\bdrool\w*"),
            _ctx(r"\bgagging\b", r"\b(?:turn\w* blue|blue|cant breath\w*|not breathing)\b"),
            _ctx(r"\b(?:swallowed|inhaled|stuck)\b.{0,30}\b(?:coin|toy|lego|marble|bead|grape|nut|peanut|bone|"
                 r"piece of|button|bottle cap|cap|balloon)\b",
                 r"\b(?:gagging|drool\w*|cant swallow|wont swallow|retching|wheez\w*|coughing and)\b"),
        ),
    ),
    RedFlag(
        "unresponsive",
        "collapse or unresponsiveness",
        rules=(
            _ctx(r"\bcollapsed\b(?! lung)|\bunconscious\b|\bunresponsive\b|\bout cold\b|"
                 r"\bno pulse\b|\b(?:not|isnt|stopped) breathing\b|"
                 r"\b(?:is|went|gone|goes|and) limp\b|"
                 r"\bhasnt (?:come|woken) (?:round|around|to|up)\b|"
                 r"\bbarely (?:responsive|responding|conscious|awake)\b|\b(?:fainted|passed out) and "
                 r"(?:is |hes |shes )?still out\b|^(?:my|his|her|our) \w+ (?:just )?(?:passed out|fainted)\b"),
            _ctx(r"\b(?:wont|cant|doesnt|isnt|not|unable to) (?:wake|waking|rouse|respond\w*)\b"
                 r"(?!(?: up)? (?:for|in time|early|on time|to (?:treatment|medication|meds|chemo|"
                 r"antibiotics|therapy|texts|calls|messages|emails)))"),
        ),
    ),
    RedFlag(
        "severe_bleeding",
        "severe bleeding",
        rules=(
            _ctx(r"\b(?:wont|doesnt|cant|not|isnt|never) (?:stop|stopping|stopped) bleeding\b|"
                 r"\bbleeding (?:wont|doesnt|isnt|hasnt) (?:stop\w*|slow\w*)|"
                 r"\b(?:cant|couldnt) (?:get|make) (?:the |it )?(?:bleeding )?(?:to )?stop\b",
                 r"\b(?:bleed\w*|blood)\b"),
            _ctx(r"\b(?:spurt|gush|pump|pour|squirt|soak)\w*", r"\b(?:blood|bleed\w*)\b"),
            _ctx(r"\bbleed\w*\b.{0,50}\b(?:wont|doesnt|isnt|hasnt|not|cant|never) (?:stop\w*|slow\w*)\b"),
            _ctx(r"\bblood (?:is )?everywhere\b|\b(?:lots|loads|a lot|so much|too much) of blood\b"
                 + _NOT_A_BLOOD_TEST + r"|\blosing (?:a lot of |lots of |so much )?blood\b"
                 + _NOT_A_BLOOD_TEST),
            _ctx(r"^(?!.*\bperiods?\b).*\b(?:heavy|heavily|severe|serious|major|massive|"
                 r"uncontrol\w*) bleed\w*|"
                 r"^(?!.*\bperiods?\b).*\bbleed\w* (?:heavily|badly|a lot|profusely|everywhere)"),
            _ctx(r"\bdeep (?:cut|wound|gash|laceration)\b",
                 r"\b(?:blood|bleed\w*|bone|fat|gaping|wont close)\b"),
        ),
    ),
    RedFlag(
        "vomiting_blood",
        "vomiting or coughing up blood, or black stools",
        rules=(
            _ctx(r"\b(?:throw\w*|threw|vomit\w*|puk\w*|cough\w*|bring\w*|brought|being sick|sick)"
                 r"(?: up)? (?:(?:a lot of|lots of|some|so much|a little|a bit of|bright red|"
                 r"dark red|dark|fresh|red|clots of|what looks like) )*blood\b" + _NOT_A_BLOOD_TEST),
            _ctx(r"\bblood in (?:my|his|her|their|the) (?:vomit|sick|puke)\b"),
            _ctx(r"\bcoffee grounds?\b", r"\b(?:vomit\w*|throw\w*|threw|puk\w*|sick|looks like)\b"),
            _ctx(r"\b(?:black|tarry|tar like|tar)\b.{0,20}\b(?:poop|poo|stools?|bowel movements?|"
                 r"diarrh\w*)\b|\b(?:poop|poo|stools?)\b.{0,15}\b(?:black|tarry|like tar)\b",
                 r"\b(?:tarry|tar|dizzy|faint\w*|weak|lightheaded|light headed|pass out|blood)\b"),
            _ctx(r"\b(?:lots of|a lot of|so much|loads of|heavy|large amount of) blood\b.{0,30}"
                 r"\b(?:bottom|bum|butt|rectum|back passage|stool|poop|poo|toilet)\b"),
        ),
    ),
    RedFlag(
        "pregnancy",
        "a pregnancy emergency",
        rules=(
            _ctx(r"\b(?:pregnant|pregnancy|preggo|preggers)\b",
                 r"\b(?:bleed\w*|blood|clots?|gush\w*|"
                 r"(?:hasnt|has not|not|stopped|isnt|no longer|less) (?:\w+ )?(?:mov\w*|kick\w*)|"
                 r"(?:severe|terrible|bad|worst|really bad|awful|pounding) headache|blurr\w*|"
                 r"vision|seeing (?:spots|stars|flash\w*)|"
                 r"(?:face|hands)\b.{0,15}\b(?:swollen|swelling|puffy)|seizure|fit|convuls\w*|"
                 r"(?:severe|bad|really bad|sharp|stabbing|terrible|constant) (?:\w+ )?"
                 r"(?:pain|cramp\w*)|pain on one side|faint\w*|passed out|fever)\b"),
            _ctx(r"\b(?:[2-9]|[12]\d|3[0-6]) ?(?:weeks|wks)\b",
                 r"\bwater (?:has )?(?:broke|broken|breaking)\b|\bbaby (?:hasnt|has not|isnt|stopped|not|no longer)"
                 r" (?:\w+ )?(?:mov\w*|kick\w*)|\b(?:bleed\w*|contractions)\b"),
            _ctx(r"\b(?:see|feel|can see|can feel) (?:the )?(?:umbilical )?cord\b|"
                 r"\bcord (?:is )?(?:coming|hanging|sticking) out\b|\bprolapsed cord\b"),
            _ctx(r"\b(?:gave birth|had (?:my|the|a|our) baby|delivered|postpartum|post partum|"
                 r"c section|caesarean|cesarean)\b",
                 r"\b(?:bleed\w*|soak\w*|clots?|through (?:a|my) pad|pad every|fever|chest pain|"
                 r"cant breathe|short of breath|severe headache|seizure)\b"),
        ),
    ),
    RedFlag(
        "infant_fever",
        "fever in a baby under 3 months",
        rules=(
            _ctx(r"\b(?:(?:[0-9]|1[0-2]|one|two|three|four|five|six|seven|eight|nine|ten|eleven|"
                 r"twelve) ?(?:weeks?|wks?|wk)|(?:[12]|one|two) ?(?:months?|mos?|mths?)|"
                 r"\d{1,2} ?days?) ?old\b|\bnew ?born\b|\bneonate\b",
                 r"\b(?:fever|feverish|temp|temperature|burning up|hot to (?:the )?touch|"
                 r"feels? (?:really |very |so |super )?hot|3[89](?:\.\d)?|100\.[4-9]|"
                 r"10[1-6](?:\.\d)?)\b"),
        ),
    ),
    RedFlag(
        "sudden_headache",
        "a sudden, severe headache",
        rules=(
            _ctx(r"\bworst (?:headache|head ache|head pain|pain)\b.{0,15}"
                 r"\b(?:of (?:my|his|her|their) life|ever|i(?:ve)? ever had)\b"),
            _ctx(r"\bthunderclap\b"),
            _ctx(r"\b(?:headache|head ache|head pain|migraine|head (?:hurts|is pounding))\b",
                 r"\b(?:sudden|suddenly|out of nowhere|out of the blue|all of a sudden|"
                 r"came on (?:in|within|over) (?:seconds|a second|a minute|an instant|a few seconds)|"
                 r"in seconds|like (?:being )?(?:hit|struck|kicked)|explod\w*|10/10|"
                 r"ten out of ten|never had anything like)"),
        ),
    ),
    RedFlag(
        "sepsis_meningitis",
        "possible sepsis or meningitis",
        rules=(
            _ctx(r"\brash\b.{0,30}\b(?:doesnt|does not|dont|wont|didnt|not|isnt) "
                 r"(?:fade|blanch|go white)\b|\bnon ?blanch\w*|\bpress\w* (?:a |the )?glass\b|"
                 r"\bglass test\b|\bpurple (?:rash|spots|blotches|patches)\b|\bpinprick rash\b"),
            _ctx(r"\b(?:fever|feverish|temp|temperature|burning up|shivering|chills)\b",
                 r"\bstiff neck\b|\bneck (?:is |feels )?(?:really |very |so )?stiff\b|"
                 r"\b(?:light|brightness) hurts\b|\bcant (?:stand|look at|bear) (?:the )?(?:light|bright)"),
            _ctx(r"\b(?:fever|feverish|temp|temperature|burning up|shivering|chills|infection|"
                 r"infected|uti|surgery|operation|pneumonia|cellulitis)\b",
                 r"\b(?:confus\w*(?! about| as to| by)|not making sense|delirious|disoriented|"
                 r"(?:hard|difficult|impossible) to (?:wake|rouse)|wont wake|not waking|drowsy|"
                 r"unresponsive|(?:racing|pounding) heart|heart (?:is )?(?:racing|pounding)|"
                 r"breathing (?:really |very |so )?(?:fast|quick|rapid)|blotchy|mottled|"
                 r"(?:blue|grey|gray) (?:skin|lips)|"
                 r"feel like (?:im|i am) (?:going to|gonna) die)\b"),
        ),
    ),
    RedFlag(
        "dvt_pe",
        "a possible blood clot in the leg or lung",
        rules=(
            _ctx(r"\b(?:calf|calves|leg|legs|thigh)\b",
                 r"\b(?:swollen|swelling|swell\w*|red|hot|warm|painful|tender)\b",
                 rf"\b{_BREATHLESS}"),
            _ctx(r"\b(?:sudden|suddenly)\b.{0,30}(?:short(?:ness)? of breath|breathless|"
                 r"cant (?:catch|get) (?:my|his|her|their|a) breath)",
                 r"(?:chest|breath\w* in|when (?:i |he |she )?breath\w*|flight|plane|surgery|"
                 r"\bpill\b|birth control|pregnan\w*|cough\w* (?:up )?blood|\bleg|\bcalf)"),
            _ctx(r"\b(?:sharp|stabbing)\b.{0,20}\bpain\b.{0,30}\b(?:breath\w*|deep breath)"),
        ),
    ),
    RedFlag(
        "seizure",
        "a seizure",
        rules=(
            _ctx(rf"\bhaving (?:a |an |another )?(?:\w+ )?{_SEIZ}\b"),
            _ctx(rf"\bjust (?:had|has) (?:a |another |her first |his first |their first )?{_SEIZ}\b"),
            _ctx(rf"\b(?:never had (?:a )?|first (?:ever )?){_SEIZ}\b",
                 r"\b(?:just|now|today|tonight|right now|minutes? ago|an hour ago)\b"),
            _ctx(rf"\b{_SEIZ}\b.{{0,40}}\b(?:wont stop|not stopping|isnt stopping|still going|"
                 r"going on for|been going|for (?:over |more than )?(?:\d+|five|ten) min\w*|"
                 r"\d+ min\w*|isnt waking|not waking|wont wake|hasnt woken|not responding|"
                 r"isnt responding|wont respond)"),
            _ctx(rf"\bback to back {_SEIZ}|\b(?:another|second|multiple|several|repeated) {_SEIZ}\b"
                 r".{0,30}\b(?:without|before|not) (?:waking|wakes?|coming round|regaining)"),
            _ctx(r"\b(?:shaking|jerking|twitching|convulsing)\b.{0,30}"
                 r"\b(?:(?:wont|not|isnt|doesnt|cant) (?:respond\w*|wak\w*|answer\w*)|"
                 r"unresponsive|unconscious|eyes rolled)"),
        ),
    ),
    RedFlag(
        "head_injury",
        "a serious head injury",
        rules=(
            _ctx(r"\b(?:hit|hits|banged|bumped|knocked|smacked|bashed|cracked|struck|landed on)"
                 r" (?:his|her|my|their|the|your) head\b|\bhead (?:injury|injuries|trauma|knock|wound)\b|"
                 r"\bconcuss\w*|\bfell\b.{0,40}\bhead\b",
                 r"\b(?:vomit\w*|throw\w* up|threw up|puk\w*|being sick|confus\w*|pass\w* out|"
                 r"blacked out|knocked out|unconscious|out cold|blood thinners?|warfarin|eliquis|"
                 r"xarelto|anticoagulant\w*|sleepy|drowsy|wont wake|hard to wake|fluid|pupils?|"
                 r"seizure|fit|slurr\w*|(?:bad|severe|worst|terrible|really bad) headache|"
                 r"cant remember|memory|numb|not making sense|making no sense|not acting right|acting strange)\b"),
            _ctx(r"\bclear fluid\b.{0,30}\b(?:nose|ears?)\b"),
        ),
    ),
    RedFlag(
        "severe_burn",
        "a serious burn or electrical injury",
        rules=(
            _ctx(r"\b(?:burn|burns|burned|burnt)\b",
                 r"\b(?:face|eyes?|neck|genitals?|groin|hands|whole|all over|large|big|huge|"
                 r"bigger than|size of|white|leathery|charred|black|waxy|doesnt hurt|no pain|"
                 r"cant feel|chemical|acid|bleach|drain|caustic|lye|electric\w*|lightning|"
                 r"smoke|fire|flames?|baby|infant|toddler)\b"),
            _ctx(r"\b(?:boiling|scalding|hot) (?:water|oil|tea|coffee|soup|liquid)\b|\bscald\w*",
                 r"\b(?:blister\w*|skin (?:is )?(?:peel\w*|coming off|white)|baby|infant|"
                 r"toddler|kid|child|son|daughter)\b"),
            _ctx(r"\b(?:bleach|bleech|acid|chemicals?|cleaner|lye|ammonia|oven cleaner|drain cleaner|"
                 r"pepper spray|caustic)\b.{0,40}\b(?:eye|eyes)\b|\b(?:eye|eyes)\b.{0,30}\b(?:bleach|acid|"
                 r"chemicals?|lye|ammonia|caustic)\b"),
            _ctx(r"\belectr\w* (?:shock|shocked|burn)\b|\belectrocut\w*|\bshocked by\b|"
                 r"\bstruck by lightning\b"),
            _ctx(r"\b(?:breathed|breathing|inhaled|inhaling|swallowed) (?:in )?(?:a lot of |lots of |"
                 r"so much |some )?smoke\b|\bsmoke inhalation\b|\b(?:house|kitchen|car) fire\b|"
                 r"\bcaught (?:on )?fire\b"),
        ),
    ),
    RedFlag(
        "diabetic_emergency",
        "a diabetic emergency (very low or very high blood sugar)",
        rules=(
            _ctx(r"\b(?:diabetic|diabetes|type (?:1|one|2|two)|t1d|t2d|insulin|blood sugar|"
                 r"sugar levels?|bgl|glucose)\b",
                 r"\b(?:confus\w*(?! about| as to| by)|not making sense|making no sense|"
                 r"wont wake|hard to wake|cant wake|unconscious|unresponsive|pass\w* out|"
                 r"passed out|collapsed|fruity|acetone|drows\w*|slurr\w*|seizure|fit|"
                 r"acting (?:weird|strange|drunk))\b"),
            # very low reading: 10-49 mg/dL or 1.0-3.4 mmol/L
            _ctx(r"\b(?:blood sugar|sugar|glucose|bgl|bg|reading)\b.{0,20}"
                 r"\b(?:[1-4]\d|[12](?:\.\d)?|3(?:\.[0-4])?)\b"
                 r"(?!\s*(?:years?|yrs?|days?|weeks?|mins?|minutes?|hours?|hrs?|%|times))"),
            # very high reading with vomiting, fast breathing or confusion (ketoacidosis)
            _ctx(r"\b(?:blood sugar|sugar|glucose|bgl|bg)\b.{0,20}\b(?:[3-9]\d\d|over \d+|hi|"
                 r"high|through the roof|off the charts?)\b",
                 r"\b(?:vomit\w*|throw\w* up|threw up|puk\w*|breath\w* (?:fast|hard|deep|heav\w*)|"
                 r"fruity|confus\w*|drows\w*|stomach pain|belly pain|ketones?)\b"),
            _ctx(r"\b(?:too much|twice|double|extra|wrong) (?:dose of |amount of )?"
                 r"(?:my |his |her |their )?insulin\b|\binsulin (?:twice|two times|double)\b"),
        ),
    ),
    RedFlag(
        "severe_abdominal_pain",
        "severe abdominal pain",
        rules=(
            _ctx(rf"\b(?:severe|worst|really bad|very bad|so bad|unbearable|excruciating|"
                 rf"agoni\w*|stabbing|crippling|intense|horrible|terrible|10/10)\b.{{0,25}}"
                 rf"\b{_BELLY}\b|\b{_BELLY}\b.{{0,10}}\b(?:pain|ache|hurts?)\b.{{0,15}}"
                 rf"\b(?:so bad|unbearable|severe|excruciating|worst)\b"),
            _ctx(rf"\b{_BELLY}\b.{{0,30}}\b(?:hard as a (?:board|rock)|rigid|board like)\b"),
            _ctx(rf"\b(?:lower )?right (?:lower )?side\b.{{0,30}}\b{_BELLY}\b|"
                 rf"\b{_BELLY}\b.{{0,30}}\bright side\b|\blower right\b",
                 r"\b(?:fever|temperature|cant (?:stand|walk|move)|vomit\w*|throw\w* up|"
                 r"getting worse|when i (?:walk|move|cough))\b"),
        ),
    ),
    RedFlag(
        "infant_unwell",
        "a very unwell baby (floppy, not feeding, a bulging soft spot, hard to wake)",
        rules=(
            _ctx(r"\b(?:baby|babys|infant|newborn|\d{1,2} ?(?:weeks?|wks?|months?|mos?) old)\b",
                 r"\b(?:floppy|limp|(?:wont|not|isnt|stopped|refusing to|refuses to) (?:feed\w*|eat\w*|drink\w*|"
                 r"nurs\w*|wake|waking)|soft spot (?:is )?(?:bulg\w*|swollen|raised|sunken)|bulging (?:soft spot|"
                 r"fontanelle)|(?:hard|difficult) to wake|high pitched cr\w*|no wet (?:nappies|diapers))\b"),
        ),
    ),
    RedFlag(
        "testicular_pain",
        "sudden testicle pain (a possible twisted testicle)",
        rules=(
            _ctx(r"\b(?:testicles?|testes|testis|balls|scrotum|nuts)\b",
                 r"\b(?:sudden|suddenly|severe|really bad|very bad|so bad|excruciating|unbearable|agoni\w*|worst|"
                 r"swollen|swelling|throw\w* up|threw up|vomit\w*)\b",
                 r"\b(?:pain|painful|hurts?|hurting|ache|aching|swollen|swelling)\b"),
        ),
    ),
    RedFlag(
        "near_drowning",
        "a near-drowning",
        rules=(
            _ctx(r"\b(?:pulled|dragged|got|fished|rescued)\b.{0,25}\bout of (?:the )?(?:pool|water|lake|river|sea|"
                 r"ocean|bath|bathtub|tub|pond)\b|\b(?:nearly|almost) drown\w*|\bdrowning\b|\bunder ?water\b.{0,20}"
                 r"\b(?:minutes?|mins?|seconds|too long)\b|"
                 r"\bface down in (?:the )?(?:pool|water|bath|bathtub|tub|pond)\b|"
                 r"\bfound (?:\w+ )?in the (?:pool|bath|bathtub|tub|pond)\b"),
        ),
    ),
    RedFlag(
        "spinal_injury",
        "a possible neck or back (spinal) injury",
        rules=(
            _ctx(r"\b(?:cant (?:feel|move)|no feeling in|numb\w*|tingl\w*) (?:in )?(?:my |his |her |their |both )?"
                 r"(?:legs|arms|feet|toes|hands|body)\b|"
                 r"\b(?:legs|arms|feet|hands)\b.{0,20}\b(?:numb|tingl\w*|paraly\w*)",
                 r"\b(?:fell|fall|fallen|falling|crash\w*|accident|dove|dived|diving|thrown|landed|hit by|tackled)\b"),
        ),
    ),
    RedFlag(
        "violence",
        "a threat of violence",
        rules=(
            _ctx(r"\b(?:threaten\w*|going|gonna|trying|tried|wants?) to (?:kill|hurt|strangle|stab|shoot) "
                 r"(?:me|us|my|his|her|their|the kids|our|him|them)\b(?! (?:nerves?|hair|plants?|weeds?|bacteria|germs|"
                 r"infection|virus|cancer|pain))",
                 r"\b(?:husband|wife|partner|boyfriend|girlfriend|ex|dad|father|mom|mother|son|daughter|brother|"
                 r"sister|neighbou?r|roommate|flatmate|he|she|they|someone|somebody|man|guy|voices?)\b"),
            _ctx(r"\bvoices? (?:telling|tell|told|tells) (?:me|him|her|them) to (?:kill|hurt|harm|attack|stab) "
                 r"(?:people|someone|others|somebody|him|her|them|my|the)\b"),
        ),
    ),
)
