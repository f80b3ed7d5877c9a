"""Vocabularies and time units shared by the generator, the features and the online API."""

HOUR, DAY = 3600.0, 86400.0
CURRENCIES = ("USD", "EUR", "GBP", "CNY", "JPY")
CHANNELS = ("pos", "online", "atm")
CATEGORIES = ("grocery", "restaurant", "fuel", "retail", "electronics", "travel",
              "entertainment", "health", "digital_goods", "jewelry")
