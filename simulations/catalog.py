"""A small bilingual product catalogue and query vocabulary for the synthetic merchants."""

from __future__ import annotations

# category → (English name, Chinese name, [(product, base price)])
CATEGORIES: dict[str, tuple[str, str, list[tuple[str, float]]]] = {
    "phones": (
        "phone",
        "手机",
        [
            ("iPhone 12", 5999),
            ("iPhone 14 Pro", 7999),
            ("Xiaomi 13", 3999),
            ("Huawei Mate 50", 4999),
            ("Galaxy S23", 5699),
            ("Redmi Note 12", 1299),
        ],
    ),
    "laptops": (
        "laptop",
        "笔记本电脑",
        [
            ("MacBook Air", 7999),
            ("ThinkPad X1", 9999),
            ("Matebook 14", 5499),
            ("Legion 5", 6999),
            ("Surface Laptop", 8288),
        ],
    ),
    "shoes": (
        "shoes",
        "运动鞋",
        [
            ("Air Max 270", 899),
            ("Ultraboost 22", 1099),
            ("Li Ning Way of Wade", 699),
            ("Anta KT8", 599),
            ("Converse Chuck 70", 569),
        ],
    ),
    "beauty": (
        "skincare",
        "护肤品",
        [
            ("SK-II essence", 1540),
            ("Lancome serum", 1080),
            ("Estee Lauder night repair", 920),
            ("Shiseido sunscreen", 260),
            ("Innisfree green tea toner", 150),
        ],
    ),
    "home": (
        "home",
        "家居",
        [
            ("Dyson V12 vacuum", 4490),
            ("Xiaomi air purifier", 899),
            ("IKEA desk lamp", 149),
            ("memory foam pillow", 199),
            ("rice cooker", 399),
        ],
    ),
    "books": (
        "book",
        "图书",
        [
            ("Three Body Problem", 68),
            ("Python Crash Course", 89),
            ("To Live 活着", 35),
            ("Atomic Habits", 59),
            ("A Brief History of Time", 45),
        ],
    ),
    "snacks": (
        "snacks",
        "零食",
        [
            ("mixed nuts gift box", 128),
            ("Oreo cookies", 25),
            ("spicy strips 辣条", 15),
            ("instant noodles pack", 39),
            ("dried mango", 29),
        ],
    ),
    "toys": (
        "toy",
        "玩具",
        [
            ("LEGO Technic car", 899),
            ("Rubik cube", 39),
            ("remote control drone", 499),
            ("plush panda", 89),
            ("Switch game Zelda", 399),
        ],
    ),
}

# Words a customer who is about to buy tends to search for, and words of a browsing customer.
INTENT_QUERY_WORDS = [
    "price",
    "discount",
    "coupon",
    "in stock",
    "free shipping",
    "包邮",
    "优惠券",
    "best deal",
    "fast delivery",
    "官方旗舰店",
    "size guide",
    "warranty",
]
BROWSE_QUERY_WORDS = [
    "ideas",
    "inspiration",
    "trending",
    "推荐",
    "top 10",
    "what is",
    "vs",
    "pictures",
    "cheap",
    "new arrivals",
    "好看",
    "review video",
]

REVIEW_TEXTS = {
    5: ["great quality, fast delivery", "非常好 推荐购买", "exactly as described"],
    4: ["good value for money", "还不错", "works well"],
    3: ["okay but packaging was damaged", "一般般", "average quality"],
    2: ["not as described", "质量一般 不推荐", "slow delivery"],
    1: ["broken on arrival", "很差", "asked for a refund"],
}
