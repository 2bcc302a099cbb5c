"""The RAYPACK API's food vocabulary over ImageNet-1k (efficientnet_lite0's label ids): each food or drink class
with its German name and the broader tags that honestly hold for every picture of it (carbonara is pasta,
espresso is coffee and a drink). A parent tag's value is the sum of its classes' scores: the classes exclude each
other (softmax), so the sum is the model's probability that the picture shows any of them.

Kept as Python, not YAML, so that it ships inside the package. The English name is ImageNet's: a label is
mapped only when the model gave it that name at that id (another model's ids mean other things).
"""

from __future__ import annotations

# ImageNet id -> (ImageNet's English name, German name, parent tags)
CLASSES: dict[int, tuple[str, str, tuple[str, ...]]] = {
    924: ("guacamole", "Guacamole", ("dip", "food")),
    925: ("consomme", "Kraftbrühe", ("soup", "food")),
    926: ("hot pot", "Feuertopf", ("soup", "food")),
    927: ("trifle", "Trifle", ("dessert", "food")),
    928: ("ice cream", "Eiscreme", ("dessert", "food")),
    929: ("ice lolly", "Eis am Stiel", ("dessert", "food")),
    930: ("French loaf", "Baguette", ("bread", "baked goods", "food")),
    931: ("bagel", "Bagel", ("bread", "baked goods", "food")),
    932: ("pretzel", "Brezel", ("baked goods", "food")),
    933: ("cheeseburger", "Cheeseburger", ("fast food", "meat", "food")),
    934: ("hotdog", "Hotdog", ("fast food", "sausage", "food")),
    935: ("mashed potato", "Kartoffelpüree", ("potato", "food")),
    936: ("head cabbage", "Weißkohl", ("cabbage", "vegetable", "food")),
    937: ("broccoli", "Brokkoli", ("cabbage", "vegetable", "food")),
    938: ("cauliflower", "Blumenkohl", ("cabbage", "vegetable", "food")),
    939: ("zucchini", "Zucchini", ("vegetable", "food")),
    940: ("spaghetti squash", "Spaghettikürbis", ("squash", "vegetable", "food")),
    941: ("acorn squash", "Eichelkürbis", ("squash", "vegetable", "food")),
    942: ("butternut squash", "Butternusskürbis", ("squash", "vegetable", "food")),
    943: ("cucumber", "Gurke", ("vegetable", "food")),
    944: ("artichoke", "Artischocke", ("vegetable", "food")),
    945: ("bell pepper", "Paprika", ("vegetable", "food")),
    946: ("cardoon", "Kardone", ("vegetable", "food")),
    # ImageNet's mushrooms are wild ones as often as kitchen ones: no parent claimed.
    947: ("mushroom", "Pilz", ()),
    948: ("Granny Smith", "Granny Smith", ("apple", "fruit", "food")),
    949: ("strawberry", "Erdbeere", ("fruit", "food")),
    950: ("orange", "Orange", ("citrus fruit", "fruit", "food")),
    951: ("lemon", "Zitrone", ("citrus fruit", "fruit", "food")),
    952: ("fig", "Feige", ("fruit", "food")),
    953: ("pineapple", "Ananas", ("fruit", "food")),
    954: ("banana", "Banane", ("fruit", "food")),
    955: ("jackfruit", "Jackfrucht", ("fruit", "food")),
    956: ("custard apple", "Cherimoya", ("fruit", "food")),
    957: ("pomegranate", "Granatapfel", ("fruit", "food")),
    959: ("carbonara", "Carbonara", ("pasta", "food")),
    960: ("chocolate sauce", "Schokoladensoße", ("sauce", "chocolate", "dessert", "food")),
    # Raw dough is not yet baked goods.
    961: ("dough", "Teig", ("food",)),
    962: ("meat loaf", "Hackbraten", ("meat", "food")),
    963: ("pizza", "Pizza", ("fast food", "food")),
    964: ("potpie", "Pot Pie", ("pie", "food")),
    965: ("burrito", "Burrito", ("fast food", "food")),
    966: ("red wine", "Rotwein", ("wine", "alcohol", "drink")),
    967: ("espresso", "Espresso", ("coffee", "drink")),
    # Eggnog is made with and without spirits: only "drink" holds.
    969: ("eggnog", "Eierpunsch", ("drink",)),
    987: ("corn", "Mais", ("vegetable", "food")),
    # ImageNet's "ear, spike, capitulum": ears of grain, mostly corn cobs.
    998: ("ear", "Ähre", ("grain",)),
}

# parent tag -> German name
PARENTS: dict[str, str] = {
    "alcohol": "Alkohol",
    "apple": "Apfel",
    "baked goods": "Backwaren",
    "bread": "Brot",
    "cabbage": "Kohl",
    "chocolate": "Schokolade",
    "citrus fruit": "Zitrusfrucht",
    "coffee": "Kaffee",
    "dessert": "Nachtisch",
    "dip": "Dip",
    "drink": "Getränk",
    "fast food": "Fast Food",
    "food": "Essen",
    "fruit": "Obst",
    "grain": "Getreide",
    "meat": "Fleisch",
    "pasta": "Pasta",
    "pie": "Pastete",
    "potato": "Kartoffel",
    "sauce": "Soße",
    "sausage": "Wurst",
    "soup": "Suppe",
    "squash": "Kürbis",
    "vegetable": "Gemüse",
    "wine": "Wein",
}
