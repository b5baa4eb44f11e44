"""The demo's word tables and sentence templates: the data demo_texts generates from."""

from __future__ import annotations

import re
from dataclasses import dataclass

# One coined word a line: ``coined meaning part1 part2``, grouped by the slot kind the templates fill. Nouns are
# split by what makes sense in a sentence (things you carry, creatures, places you walk to, things in the sky);
# adjectives into moods (of people) and qualities (of things); verbs into intransitive and transitive ones. Verbs
# are in the base form and only used where the base form fits ("began to _", "would _"), nouns only in the
# singular, so a coined word is always the exact stand-in for one fixed ordinary word.
_TABLE = {
    "thing": """
        lantandle lamp lantern candle
        hampicker basket hamper wicker
        teauldron kettle teapot cauldron
        quilverlet blanket quilt coverlet
        jackloak coat jacket cloak
        bonnelmet hat bonnet helmet
        clopper boot clog slipper
        envelchment letter envelope parchment
        volurnal book volume journal
        latchoken key latch token
        spoodle spoon spoon ladle
        mugblet cup mug goblet
        flaskanter bottle flask decanter
        cofferate box coffer crate
        cordwine rope cord twine
        taperwick candle taper wick
        bangcelet ring bangle bracelet
        pennickel coin penny nickel
        chartlas map chart atlas
        chingle bell chime jingle
        bladger knife blade dagger
        glassirror mirror glass mirror
        cushillow pillow cushion pillow
        parabrella umbrella parasol umbrella
        collerchief collar collar kerchief
        glovitten glove glove mitten
        hourlock clock hourglass clock
        pipistle whistle pipe whistle
        tambrum drum tambour drum
        quillencil pencil quill pencil
        besomop broom besom mop
        pailucket bucket pail bucket
        stiladder ladder stile ladder
        benchair chair bench chair
        trestable table trestle table
        casindow window casement window
        doortal door door portal
        ribbassel ribbon ribbon tassel
        claspton button clasp button
        needkin needle needle bodkin
        pursack bag purse sack
        crumploaf bread crumpet loaf
        peapple apple pear apple
        custake cake custard cake
        barrowagon cart barrow wagon
        spadovel shovel spade shovel
        mallammer hammer mallet hammer
        jitcher jug jug pitcher
        combrush comb comb brush
        plumeather feather plume feather
    """,
    "creature": """
        owljar owl owl nightjar
        foxeret fox fox ferret
        kittabby cat kitten tabby
        mongruppy dog mongrel puppy
        ponallion horse pony stallion
        sparrinch bird sparrow finch
        crowaven crow crow raven
        bunnabbit rabbit bunny rabbit
        shrouse mouse shrew mouse
        tadrog frog tadpole frog
        snailug snail snail slug
        gandoose goose gander goose
        malluck duck mallard duck
        bumbornet bee bumblebee hornet
        motterfly moth moth butterfly
        cobider spider cobweb spider
        finnow fish fin minnow
        whalrus whale whale walrus
        wolfackal wolf wolf jackal
        grizzuin bear grizzly bruin
        stantelope deer stag antelope
        squirmunk squirrel squirrel chipmunk
        chickhen chicken chick hen
        sheepkin sheep sheep lambkin
        nannoat goat nanny goat
        swiglet pig swine piglet
        cowifer cow cow heifer
        cricketle beetle cricket beetle
        maggorm worm maggot worm
        craneron crane crane heron
    """,
    "place": """
        riverrun river river run
        knollock hill knoll hillock
        woodrest forest woodland forest
        pasadow meadow pasture meadow
        lakoon lake lake lagoon
        summountain mountain summit mountain
        vallow valley valley hollow
        pathrail path path trail
        lanoad road lane road
        gardchard garden garden orchard
        fieldock field field paddock
        grottave cave grotto cave
        atolland island atoll island
        beachore shore beach shore
        swarsh marsh swamp marsh
        pondle pond pond puddle
        streamulet stream stream rivulet
        watercade waterfall waterfall cascade
        cliffscarp cliff cliff escarpment
        harbaven harbour harbour haven
        villamlet village village hamlet
        castadel castle castle citadel
        turrower tower turret tower
        dunesert desert dune desert
        glearing clearing glade clearing
        heathmoor moor heath moor
    """,
    "sky": """
        cloudillow cloud cloud billow
        stormpest storm storm tempest
        rainizzle rain rain drizzle
        snurry snow snow flurry
        zephind wind zephyr wind
        mistog fog mist fog
        sunimmer sun sun shimmer
        moonscent moon moon crescent
        starinkle star star twinkle
        prismbow rainbow prism rainbow
        thumble thunder thunder rumble
        flashning lightning flash lightning
        firmasky sky firmament sky
        dawnbreak dawn dawn daybreak
        frosticle frost frost icicle
        twilset sunset twilight sunset
    """,
    "mood": """
        jollappy happy jolly happy
        sorroomy sad sorrow gloomy
        angrious angry angry furious
        tireary tired tired weary
        scaraid afraid scared afraid
        proughty proud proud haughty
        lonelorn lonely lonely forlorn
        tranqualm calm tranquil calm
        shyful shy shy bashful
        merriful cheerful merry cheerful
        curisitive curious curious inquisitive
        jitterous nervous jittery nervous
        stungry hungry starving hungry
        slowsy sleepy sleepy drowsy
        braviant brave brave valiant
        gentender gentle gentle tender
        envealous jealous envious jealous
        lazidle lazy lazy idle
        clevitty clever clever witty
        crumpy cross cranky grumpy
    """,
    "quality": """
        glimmerous bright glimmer glamorous
        shadurky dark shadowy murky
        ancold ancient ancient old
        frigilly cold frigid chilly
        sodamp wet sodden damp
        quilent quiet quiet silent
        weirange strange weird strange
        hugormous huge huge enormous
        tinimal tiny tiny minimal
        velvoft soft velvet soft
        warmoasty warm warm toasty
        noisterous loud noisy boisterous
        spicklean clean spick clean
        grusty dusty grimy dusty
        sugweet sweet sugary sweet
        heafty heavy heavy hefty
        narrender narrow narrow slender
        smilky smooth smooth silky
        scrough rough scruffy rough
        emptollow empty empty hollow
        gilden golden gilded golden
        crookisted crooked crooked twisted
        sharpeen sharp sharp keen
        fragrumed fragrant fragrant perfumed
        mouldotten rotten mouldy rotten
        glossiny shiny glossy shiny
    """,
    "verb": """
        smirtle smile smile chortle
        sobbimper cry sob whimper
        snoozumber sleep snooze slumber
        wandramble wander wander ramble
        shuddiver shake shudder shiver
        twirlance dance twirl dance
        singarble sing sing warble
        murmisper whisper murmur whisper
        staggumble stumble stagger stumble
        gigglicker laugh giggle snicker
        yawnetch stretch yawn stretch
        sighroan sigh sigh groan
        grumutter complain grumble mutter
        scampurry hurry scamper hurry
        quivemble quake quiver tremble
        buzzum hum buzz hum
        lingait wait linger wait
        restpose rest rest repose
        swimplash swim swim splash
        scrimb climb scramble climb
        leapounce jump leap pounce
        grimple beam grin dimple
        scrown glare scowl frown
        bellout shout bellow shout
        musonder ponder muse ponder
        cantallop race canter gallop
        lurkide hide lurk hide
        blushen flush blush redden
        blinkle blink blink twinkle
        skounce skip skip bounce
        harksten listen hark listen
        coughutter cough cough splutter
        sneaktoe creep sneak tiptoe
        shufaddle shuffle shuffle waddle
        sauntroll stroll saunter stroll
    """,
    "tverb": """
        lugarry carry lug carry
        repend mend repair mend
        burnolish polish burnish polish
        pleafold fold pleat fold
        daubaint paint daub paint
        wraddle wrap wrap swaddle
        burceal bury bury conceal
        collather gather collect gather
        liftoist lift lift hoist
        scrinse wash scrub rinse
        dropple drop drop topple
        peddsell sell peddle sell
        discofind find discover find
        unlopen open unlock open
        whistir stir whisk stir
        sewitch sew sew stitch
        bakoast bake bake roast
        buychase buy buy purchase
        thross throw throw toss
        cadgorrow borrow cadge borrow
    """,
}


@dataclass(frozen=True)
class _Entry:
    word: str
    meaning: str
    parts: tuple[str, ...]
    kind: str


def _parse_table() -> tuple[_Entry, ...]:
    entries = []
    for kind, block in _TABLE.items():
        for line in block.strip().splitlines():
            word, meaning, *parts = line.split()
            entries.append(_Entry(word, meaning, tuple(parts), kind))
    return tuple(entries)


_ENTRIES = _parse_table()

_KINDS = tuple(_TABLE)

# Ordinary filler words. None of them is a meaning word (the tests check), so a meaning word occurs in the corpus
# only where its slot was filled with it, i.e. in exactly the contexts its coined word gets.
_NAMES = (
    "Anna",
    "Shem",
    "Shaun",
    "Issy",
    "Kate",
    "Mara",
    "Tom",
    "Lucy",
    "Owen",
    "Nora",
    "Finn",
    "Rosa",
    "Jack",
    "Molly",
    "Ben",
    "Iris",
    "Hugh",
    "Clara",
    "Leo",
    "Bridget",
    "Sam",
    "Ada",
    "Eli",
    "Martha",
    "Pat",
    "Grace",
    "Luke",
    "Tess",
    "Walter",
    "June",
)

_PERSONS = (
    "the baker",
    "the ferryman",
    "the old fisherman",
    "the schoolteacher",
    "the postman",
    "the innkeeper",
    "the miller's wife",
    "the priest",
    "the shopkeeper",
    "the grocer",
    "the blacksmith",
    "the tailor",
    "the doctor",
    "the washerwoman",
    "the carpenter",
    "their grandmother",
    "their uncle",
    "the landlady",
    "the boatman",
    "the night watchman",
    "the widow across the lane",
    "the new curate",
)

_FTHINGS = (
    "parcel",
    "shawl",
    "saucer",
    "pebble",
    "wallet",
    "handkerchief",
    "notebook",
    "kite",
    "barrel",
    "apron",
    "tray",
    "sieve",
    "thimble",
    "postcard",
    "pot",
    "oar",
    "net",
    "sail",
    "chain",
    "wheel",
    "towel",
    "bowl",
    "plate",
    "sock",
    "mattress",
    "newspaper",
    "fiddle",
    "jar",
    "cushion cover",
    "picture frame",
    "lunch tin",
    "sewing kit",
)

_FPLACES = (
    "market",
    "bridge",
    "church",
    "school",
    "station",
    "kitchen",
    "cellar",
    "attic",
    "bakery",
    "mill",
    "inn",
    "square",
    "chapel",
    "library",
    "post office",
    "barn",
    "yard",
    "quay",
    "churchyard",
    "well",
    "shop",
    "farmhouse",
    "lighthouse",
    "ferry landing",
    "bus stop",
    "town hall",
)

_FADJS = (
    "little",
    "long",
    "small",
    "red",
    "blue",
    "green",
    "young",
    "new",
    "wooden",
    "grey",
    "white",
    "black",
    "round",
    "tall",
    "thin",
    "short",
    "yellow",
    "brown",
    "plain",
    "painted",
    "striped",
    "familiar",
    "borrowed",
    "ordinary",
)

_FOODS = (
    "soup",
    "porridge",
    "cheese",
    "jam",
    "potatoes",
    "biscuits",
    "honey",
    "tea",
    "milk",
    "sausages",
    "eggs",
    "oranges",
    "plums",
    "pie",
    "scones",
)

_FVERBS = (
    "walk",
    "read",
    "talk",
    "work",
    "eat",
    "cook",
    "write",
    "play",
    "think",
    "speak",
    "argue",
    "travel",
    "go out",
    "get up",
    "stay",
    "answer",
    "say goodbye",
)

_TIMES = (
    "in the morning",
    "at noon",
    "after supper",
    "on Sunday",
    "every evening",
    "before breakfast",
    "at night",
    "in the spring",
    "last winter",
    "early in the day",
    "on the way home",
    "in the afternoon",
    "at dusk",
    "on market day",
    "during the holidays",
    "after school",
    "most afternoons",
    "once a week",
)

_OPENERS = (
    "In the morning, ",
    "Later, ",
    "That evening, ",
    "Of course, ",
    "Meanwhile, ",
    "Once, ",
    "After a while, ",
    "Every summer, ",
    "Some days, ",
    "Then ",
    "Still, ",
    "As always, ",
    "By noon, ",
    "Before long, ",
    "Suddenly, ",
    "For a long time, ",
    "In those days, ",
    "Even so, ",
    "At first, ",
    "In the end, ",
    "Years ago, ",
    "Luckily, ",
)

_TAILS = (
    ", as usual",
    ", or so they said",
    " again",
    ", just as before",
    " that year",
    ", and nobody minded",
    ", though it was late",
    ", which surprised everyone",
    " for once",
    ", like every other day",
    ", to everyone's relief",
    ", and that was that",
    " in the end",
    ", more or less",
    ", as it turned out",
)

_FILLERS = {
    "name": _NAMES,
    "person": _PERSONS,
    "fthing": _FTHINGS,
    "fplace": _FPLACES,
    "fadj": _FADJS,
    "food": _FOODS,
    "fverb": _FVERBS,
    "time": _TIMES,
}

# Sentence templates. ``{kind}`` is a lexicon slot, ``{a:kind}`` the same with "a"/"an" before it, other names are
# ordinary fillers (``{name2}`` is a second name). A lexicon slot never starts a template and always follows a
# space, so a coined word is never sentence-initial, never capitalised and never glued to punctuation on its left.
# Past-tense statements may get an opener ("Later, ") or a tail (", as usual"); a leading ``=`` marks a template
# (present tense, future, first person) that takes neither, and quoted speech never does.
_TEMPLATES = """
{name} found {a:thing} near the {fplace}.
{name} kept {a:thing} under the bed.
the {thing} on the shelf belonged to {person}.
{name} gave {name2} {a:thing} for the journey.
there was {a:thing} on the counter of the {fplace}.
{name} wrapped the {thing} in brown paper and tied it with string.
nobody knew who had left the {thing} on the step.
the {thing} was {quality}, and {name} liked it that way.
{name} asked {person} for {a:thing}, but there was none left.
{name} bought {a:quality} {thing} at the {fplace}.
{name} had never seen {a:thing} so {quality}.
when {name} opened the cupboard, {a:thing} fell out.
{person} fixed the old {thing} with a bit of wire.
the {thing} stood on the shelf between the {fthing} and the {fthing}.
they packed {a:thing}, {a:fthing} and some {food} for the trip.
"Where did you put the {thing}?" asked {name}.
"Bring me the {thing}," said {person}.
{name} looked everywhere for the {thing}.
={a:thing} is a useful thing to have in the house.
{name} was looking for the {thing} {time}.
{name} took the {thing} to the {fplace}.
the {fadj} {thing} had been in the family for years.
{person} sold {name} {a:thing} for a few pennies.
{name} put the {thing} down next to the {fthing}.
it was the finest {thing} at the {fplace}.
{name} left the {thing} at the {fplace} and had to go back for it.
{a:creature} was sitting on the wall by the {fplace}.
{name} saw {a:creature} {time}.
the {creature} ran off before {name} could catch it.
{person} fed the {creature} every morning.
{a:quality} {creature} lived behind the {fplace}.
the children followed the {creature} down the lane.
=there is {a:creature} in the yard again.
{name} drew a picture of {a:creature} in a {fadj} notebook.
the {creature} looked {mood} and would not come out.
{name} heard the {creature} before seeing it.
nobody had ever seen {a:creature} so close to the town.
the {creature} began to {verb} when {name} came near.
"Look, {a:creature}!" cried {name}.
{name} told {name2} a story about {a:mood} {creature}.
the old {creature} by the {place} was known to everyone.
{person} said that {a:creature} had eaten all the {food}.
{name} wanted to keep the {creature} as a pet.
the {creature} followed {name} all the way to the {fplace}.
{name} walked along the {place} until nightfall.
they went down to the {place} {time}.
the {place} was {quality} {time}.
beyond the {place} there was a small {fplace}.
{name} grew up near the {place}.
the way to the {place} was long and {fadj}.
{person} painted the {place} from memory.
{name} and {name2} had a picnic by the {place}.
nobody went to the {place} after nightfall.
from the top of the stairs you could see the {place}.
{name} liked to {verb} by the {place}.
the {creature} lived somewhere near the {place}.
=we will meet at the {place} {time}.
"Is the {place} far from here?" asked {name}.
{name} knew every corner of the {place}.
=there is {a:place} on the other side of the water.
{person} once got lost near the {place}.
{name} watched the {sky} from the {fplace}.
the {sky} came back {time}.
{person} said the {sky} would not last.
everyone stopped to look at the {sky}.
the {sky} was {quality} that evening.
{name} had never seen {a:sky} like that.
there was {a:sky} above the {place} {time}.
after the {sky}, the {place} looked {quality}.
the children ran out to see the {sky}.
{name} could hear the {sky} from the {fplace}.
{person} stayed at the {fplace} until the {sky} had passed.
nobody talked about anything but the {sky}.
{name} felt {mood} {time}.
{person} looked {mood} and said nothing.
{name} was too {mood} to {fverb}.
it made {name} {mood} to think about the {thing}.
{name} grew {mood} whenever {name2} mentioned the {fplace}.
{a:mood} {creature} sat by the {fplace}.
"Why are you so {mood} today?" asked {name}.
{name} was {mood}, but {name2} was even more {mood}.
{name} tried not to look {mood}.
by the evening everyone was {mood}.
{person} was never {mood} on market day.
{name} came home {mood} and went straight to bed.
the {fthing} was {quality}.
{name} had {a:quality} {fthing}.
the whole {fplace} seemed {quality} {time}.
it was {a:quality} day, and {name} went to the {fplace}.
the {food} tasted {quality}.
{person} had {a:quality} voice.
everything at the {fplace} looked {quality} and {fadj}.
{name} thought the {thing} was too {quality}.
the {quality} {place} was not far from the {fplace}.
{name} liked {quality} things best.
the room was {quality} and smelled of {food}.
{name} began to {verb}.
{name} wanted to {verb} {time}.
=the children always {verb} when {person} comes in.
{name} did not {verb} at all.
{name} would {verb} for hours by the {fplace}.
=I {verb} when I am {mood}.
we used to {verb} together {time}.
{name} tried not to {verb}, but it was no use.
=let us {verb} a little before supper.
{person} told {name} not to {verb} at the {fplace}.
=the {creature} likes to {verb} {time}.
{name} could not help but {verb}.
"Do not {verb} now," said {person}.
sometimes the old men would {verb} by the fire.
{name} was about to {verb} when the {sky} began.
{name} and {name2} would often {verb} together.
nobody could {verb} like {name}.
=it is not polite to {verb} at supper.
{name} had to {verb} all the way to the {fplace}.
{name} wanted to {tverb} the {thing}.
{person} asked {name} to {tverb} the {fthing}.
=we must {tverb} the {fthing} before supper.
{name} forgot to {tverb} the {thing} again.
=they will {tverb} the {fthing} tomorrow.
it took an hour to {tverb} the {fthing}.
={name} knows how to {tverb} {a:thing} properly.
"Please {tverb} the {fthing}," said {name}.
{name} did not want to {tverb} anything.
{person} would {tverb} the {fthing} and then go home.
{name} offered to {tverb} the {fthing} for {person}.
nobody had time to {tverb} the {thing}.
{name} saw {a:creature} near the {place} and began to {verb}.
the {creature} hid under the {fthing} by the {place}.
after the {sky}, {name} went down to the {place} to {tverb} the {thing}.
when the {sky} came, the {creature} looked {mood}.
{name} felt {mood} and took the {thing} to the {place}.
the {place} was {quality} under the {sky}.
{person} watched the {creature} {verb} in the {sky}.
{name} was {mood} because the {thing} was so {quality}.
"""

_TEMPLATE_LIST = tuple(line for line in _TEMPLATES.strip().splitlines() if line)

_SLOT = re.compile(r"\{(a:)?(\w+)\}")
