"""Hand-written prose (ours, no licence needed) that passes or fails the quality filters on purpose."""

ENGLISH = [
    "Bread has been baked for thousands of years, and the basic method has changed very little. "
    "A baker mixes flour with water and a little salt, then adds yeast so that the dough will rise. "
    "The dough is kneaded until it becomes smooth and elastic, which can take about ten minutes by hand.",
    "After kneading, the dough rests in a warm place while the yeast produces gas. "
    "This first rise usually takes one or two hours, depending on the temperature of the kitchen. "
    "When the dough has doubled in size, the baker presses out the air and shapes the loaf.",
    "The shaped loaf rises a second time before it goes into a hot oven. "
    "Many bakers place a tray of water at the bottom of the oven, because the steam helps the crust to form. "
    "A good loaf sounds hollow when you tap the bottom, and it should cool completely before it is sliced.",
    "People who bake at home often keep notes about each attempt. "
    "They write down the amount of water, the time of each rise and the heat of the oven, so that they "
    "can repeat a good result. "
    "Over time these small records turn into a reliable recipe that belongs to the family.",
]
FRENCH = [
    "Le pain est fabriqué depuis des milliers d'années, et la méthode de base a très peu changé. "
    "Le boulanger mélange la farine avec de l'eau et un peu de sel, puis il ajoute de la levure pour "
    "que la pâte lève. La pâte est pétrie jusqu'à ce qu'elle devienne lisse et élastique, ce qui peut "
    "prendre une dizaine de minutes.",
    "Après le pétrissage, la pâte repose dans un endroit chaud pendant que la levure produit du gaz. "
    "Cette première levée dure en général une ou deux heures, selon la température de la cuisine. "
    "Quand la pâte a doublé de volume, le boulanger chasse l'air et façonne le pain.",
]


def html(title: str, paragraphs: list[str]) -> bytes:
    body = "".join(f"<p>{p}</p>\n" for p in paragraphs)
    return (f"<!doctype html><html><head><title>{title}</title></head><body><header><nav>"
            f"<a href='/'>Home</a> <a href='/about'>About</a></nav></header><main><article>"
            f"<h1>{title}</h1>\n{body}</article></main><footer>Site footer</footer></body>"
            f"</html>").encode()
