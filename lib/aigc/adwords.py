"""The words of the embedded ad copy (see `aigc.corpus`): categories, brands and tones.

Every list is a set of alternatives of one grammar rule, so no list repeats an item, and the tones share
no phrase (an ad's words then tell its tone).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    """The vocabulary one product category contributes; every ad names exactly one of its products."""

    products: tuple[str, ...]
    materials: tuple[str, ...]
    benefits: tuple[str, ...]
    details: tuple[str, ...]
    slogans: tuple[str, ...]
    audiences: tuple[str, ...]


CATEGORIES: dict[str, Category] = {
    "footwear": Category(
        products=("running shoe", "trail runner", "walking sneaker", "hiking boot", "slip-on loafer",
                  "court sneaker", "recovery sandal", "rain boot"),
        materials=("breathable mesh upper", "recycled knit upper", "waterproof leather", "cushioned foam midsole",
                   "grippy rubber outsole", "lightweight carbon plate", "memory foam insole", "reinforced toe cap"),
        benefits=("all-day comfort", "a springy stride", "sure footing on wet trails", "a snug locked-in fit",
                  "blister-free miles", "quick-dry performance", "support where you need it", "a barely-there feel"),
        details=("Built for long runs and everyday errands.", "Tested on city streets and mountain trails.",
                 "Designed with podiatrists for natural alignment.", "Light enough to pack, tough enough to last.",
                 "Each pair is stitched by hand.", "The heel counter keeps every step steady."),
        slogans=("Comfort that moves with you.", "Every step, lighter.", "Run further. Recover faster.",
                 "Made for the miles ahead.", "Your feet will thank you.", "Go anywhere in comfort."),
        audiences=("runners", "hikers", "commuters", "weekend walkers", "nurses and teachers"),
    ),
    "audio": Category(
        products=("wireless earbuds", "over-ear headphones", "portable speaker", "soundbar", "smart speaker",
                  "noise-cancelling headphones", "studio monitor", "bluetooth turntable"),
        materials=("custom 40mm drivers", "adaptive noise cancelling", "a 30-hour battery", "spatial audio",
                   "dual beamforming microphones", "memory foam ear cushions", "a water-resistant shell",
                   "multipoint bluetooth"),
        benefits=("studio-quality sound", "deep punchy bass", "crystal-clear calls", "pure focus on the go",
                  "room-filling sound", "all-day listening", "effortless pairing", "distortion-free volume"),
        details=("Tuned by award-winning sound engineers.", "Pairs with your phone in seconds.",
                 "A quick ten-minute charge gives you three hours of play.", "Folds flat to slip into any bag.",
                 "Touch controls put your music at your fingertips.", "Every unit is tested in an anechoic chamber."),
        slogans=("Hear every detail.", "Sound that moves you.", "Turn up the quiet.", "Your music, everywhere.",
                 "Feel the beat.", "Silence the noise, not the music."),
        audiences=("music lovers", "podcast fans", "gamers", "frequent flyers", "home studio producers"),
    ),
    "kitchen": Category(
        products=("chef's knife", "cast iron skillet", "espresso machine", "stand mixer", "nonstick pan set",
                  "high-speed blender", "air fryer", "pour-over kettle"),
        materials=("forged German steel", "enameled cast iron", "a 15-bar pump", "a ceramic nonstick coating",
                   "a 1200-watt motor", "a stainless steel body", "precision temperature control",
                   "an ergonomic walnut handle"),
        benefits=("restaurant-quality results", "even heat from edge to edge", "effortless cleanup",
                  "cafe-style coffee at home", "silky smooth blends", "crispy results with less oil",
                  "perfect control at every pour", "years of reliable cooking"),
        details=("Dishwasher safe and built to last.", "Heats up in under a minute.",
                 "Chosen by professional chefs worldwide.", "Comes with a recipe book of 50 favorites.",
                 "Its compact footprint fits any counter.", "Balanced for hours of comfortable prep."),
        slogans=("Cook like a pro.", "Good food starts here.", "Made for the way you cook.", "Dinner, done better.",
                 "Your kitchen, upgraded.", "Taste the difference."),
        audiences=("home cooks", "busy families", "coffee lovers", "weekend bakers", "aspiring chefs"),
    ),
    "skincare": Category(
        products=("vitamin C serum", "daily moisturizer", "gentle cleanser", "mineral sunscreen",
                  "retinol night cream", "hydrating face mask", "eye cream", "lip balm"),
        materials=("hyaluronic acid", "plant-based squalane", "niacinamide", "SPF 50 broad-spectrum protection",
                   "soothing aloe vera", "cold-pressed rosehip oil", "ceramides", "a fragrance-free formula"),
        benefits=("a radiant glow", "deep lasting hydration", "visibly smoother skin", "a calm even complexion",
                  "protection without a white cast", "softer skin overnight", "brighter-looking eyes",
                  "nourished lips all day"),
        details=("Dermatologist tested and safe for sensitive skin.", "Free from parabens and sulfates.",
                 "Absorbs in seconds with no greasy feel.", "Never tested on animals.",
                 "Packaged in fully recyclable glass.", "Results you can see in two weeks."),
        slogans=("Glow from within.", "Your skin, only better.", "Beauty that cares.", "Simply radiant.",
                 "Healthy skin starts today.", "Less routine, more glow."),
        audiences=("sensitive skin", "busy mornings", "every skin type", "minimalist routines", "city living"),
    ),
    "outdoor": Category(
        products=("ultralight tent", "down sleeping bag", "insulated water bottle", "trekking pole set",
                  "rain jacket", "camping hammock", "headlamp", "daypack"),
        materials=("ripstop nylon", "800-fill responsibly sourced down", "double-wall vacuum insulation",
                   "aircraft-grade aluminum", "a seam-sealed waterproof shell", "a 300-lumen LED",
                   "a padded hip belt", "a packable stuff sack"),
        benefits=("shelter in any weather", "warmth on the coldest nights", "ice-cold water for 24 hours",
                  "steady footing on steep climbs", "dry comfort in a downpour", "easy setup in minutes",
                  "bright light when you need it", "all-day carrying comfort"),
        details=("Field tested from the Alps to the desert.", "Packs down smaller than a loaf of bread.",
                 "Weighs less than two pounds.", "Backed by our lifetime repair promise.",
                 "Sets up in under five minutes.", "Made with bluesign-approved fabrics."),
        slogans=("Adventure awaits.", "Go further, pack lighter.", "Built for the wild.", "Find your trail.",
                 "Nature is calling.", "Every summit starts here."),
        audiences=("backpackers", "campers", "climbers", "trail runners", "weekend explorers"),
    ),
    "home": Category(
        products=("linen duvet cover", "memory foam pillow", "weighted blanket", "robot vacuum",
                  "smart thermostat", "scented candle", "air purifier", "bath towel set"),
        materials=("stonewashed European linen", "cooling gel memory foam", "glass bead fill", "laser navigation",
                   "learning temperature sensors", "a natural soy wax blend", "a true HEPA filter",
                   "long-staple Turkish cotton"),
        benefits=("deeper more restful sleep", "a calm cozy evening", "spotless floors every day",
                  "lower energy bills", "a warm inviting glow", "fresher cleaner air", "hotel-level softness",
                  "breathable comfort all night"),
        details=("Gets softer with every wash.", "Runs quietly while you sleep.", "Controls easily from your phone.",
                 "Certified free of harmful chemicals.", "Designed to blend into any room.",
                 "Each piece is finished by hand."),
        slogans=("Home, but better.", "Rest easy.", "Comfort you can feel.", "Live beautifully.",
                 "Make yourself at home.", "The little things make a house a home."),
        audiences=("light sleepers", "pet owners", "small apartments", "growing families", "new homeowners"),
    ),
    "fitness": Category(
        products=("adjustable dumbbell set", "yoga mat", "resistance band kit", "smart jump rope", "foam roller",
                  "fitness tracker", "kettlebell", "indoor cycling bike"),
        materials=("a quick-change dial system", "natural tree rubber", "layered latex bands",
                   "a built-in rep counter", "high-density EVA foam", "a heart rate sensor",
                   "a powder-coated cast iron shell", "magnetic resistance"),
        benefits=("a full-body workout at home", "a stable grip in every pose", "progressive strength training",
                  "smarter cardio sessions", "faster muscle recovery", "real-time progress tracking",
                  "a comfortable confident grip", "a whisper-quiet ride"),
        details=("Replaces a full rack of weights.", "Syncs with your favorite fitness apps.",
                 "Rolls up small for easy storage.", "Includes a guided twelve-week program.",
                 "Engineered to survive daily training.", "Trusted by personal trainers everywhere."),
        slogans=("Stronger every day.", "Your gym, anywhere.", "Train smarter.", "Sweat now, shine later.",
                 "Progress starts at home.", "No excuses, just results."),
        audiences=("home athletes", "yoga lovers", "busy professionals", "beginners", "serious lifters"),
    ),
    "travel": Category(
        products=("carry-on suitcase", "packing cube set", "travel backpack", "neck pillow", "passport wallet",
                  "garment bag", "duffel bag", "luggage tracker"),
        materials=("a polycarbonate hard shell", "360-degree spinner wheels", "water-repellent nylon",
                   "an RFID-blocking lining", "a compression zipper", "a lay-flat laptop sleeve",
                   "an adjustable memory foam core", "a replaceable battery"),
        benefits=("stress-free boarding", "more room in less space", "hands-free airport runs",
                  "restful sleep on long flights", "organized essentials", "wrinkle-free arrivals",
                  "weekend trips made easy", "peace of mind at every gate"),
        details=("Fits the overhead bin on most airlines.", "Glides smoothly over cobblestones.",
                 "Opens flat like a suitcase.", "Weighs just over five pounds.", "Tracks your bag from any phone.",
                 "Every zipper is tested ten thousand times."),
        slogans=("Travel lighter.", "Ready when you are.", "The world is waiting.", "Pack less, see more.",
                 "Journey in style.", "Go places."),
        audiences=("frequent flyers", "digital nomads", "business travelers", "families on the go",
                   "weekend travelers"),
    ),
}

BRANDS = (
    "AeroLite", "Nimbus", "Kestrel", "Solace", "Brightwater", "Northpeak", "Verra", "Lumen", "Hollis", "Tidewell",
    "Marlow", "Corvid", "Alder", "Quill", "Ember", "Fathom", "Juniper", "Sable", "Wren", "Halcyon",
    "Orbit", "Cascade", "Meridian", "Pinecrest", "Vela", "Thistle", "Bramble", "Solstice", "Arbor", "Glint",
    "Otter", "Larkspur", "Mosaic", "Cobalt", "Evergreen", "Harbor", "Fable", "Sprig", "Tempo", "Zephyr",
)


@dataclass(frozen=True)
class Tone:
    """The words one tone contributes; no two tones share a phrase, so the ad spells out its tone."""

    intros: tuple[str, ...]
    offer_intros: tuple[str, ...]
    ctas: tuple[str, ...]


TONES: dict[str, Tone] = {
    "friendly": Tone(
        intros=("Introducing", "Meet", "Say hello to"),
        offer_intros=("Now on sale:", "Big savings on", "A great deal on"),
        ctas=("Shop it today.", "Order yours today.", "Add it to your cart."),
    ),
    "urgent": Tone(
        intros=("Hurry and grab", "Don't miss", "Act fast on"),
        offer_intros=("Last chance for", "Going fast:", "Final hours for"),
        ctas=("Order now before it's gone.", "Get yours before they're gone.", "Shop now, this won't last."),
    ),
    "playful": Tone(
        intros=("Fall in love with", "Treat yourself to", "Get giddy for"),
        offer_intros=("Psst, a deal on", "Surprise savings on", "Oh yes, a sale on"),
        ctas=("Go on, treat yourself.", "Your cart is calling.", "Grab yours and smile."),
    ),
    "premium": Tone(
        intros=("Discover", "Experience", "Presenting"),
        offer_intros=("An exclusive offer on", "A private sale on", "A members' price on"),
        ctas=("Find yours online or in stores.", "Visit your nearest store.", "Explore the collection."),
    ),
}
