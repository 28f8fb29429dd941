"""Fixed texts of the demo crawl: foreign-language paragraphs (written for this project),
localized boilerplate, spam material and near-duplicate edits."""
from __future__ import annotations

from typing import Any

# Two short articles per language, two paragraphs each. Chinese is served as gb2312 and
# Russian as windows-1251, so every character here must exist in those code pages.
FOREIGN: dict[str, dict] = {
    "de": {
        "charset": "utf-8",
        "domain": "heimatblatt-online.de",
        "site": "Heimatblatt Online",
        "nav": ["Startseite", "Region", "Kultur", "Freizeit", "Kontakt"],
        "cookie": "Wir verwenden Cookies, um Ihnen die bestmögliche Nutzung unserer Webseite zu ermöglichen.",
        "accept": "Alle akzeptieren",
        "footer": ["Impressum", "Datenschutz", "Nutzungsbedingungen"],
        "rights": "Alle Rechte vorbehalten.",
        "related": "Das könnte Sie auch interessieren",
        "byline": "Veröffentlicht am",
        "articles": [
            ("Die Geschichte der Stadtbibliothek", [
                "Die Stadtbibliothek wurde im Jahr 1906 gegründet und befand sich zunächst in zwei kleinen "
                "Räumen des alten Rathauses. Schon nach wenigen Jahren reichte der Platz nicht mehr aus, denn "
                "immer mehr Bürgerinnen und Bürger liehen sich Bücher, Zeitschriften und Landkarten aus. Im "
                "Jahr 1928 zog die Bibliothek deshalb in ein eigenes Gebäude am Marktplatz, das bis heute "
                "genutzt wird.",
                "Heute bietet die Bibliothek weit mehr als gedruckte Bücher. Besucher können Hörbücher und "
                "Filme ausleihen, an Computerkursen teilnehmen oder in den ruhigen Lesesälen arbeiten. "
                "Besonders beliebt sind die Vorlesestunden für Kinder, die jeden Mittwochnachmittag "
                "stattfinden und von ehrenamtlichen Helferinnen und Helfern gestaltet werden.",
            ]),
            ("Wandern im Schwarzwald", [
                "Der Schwarzwald gehört zu den beliebtesten Wandergebieten in Deutschland. Dichte "
                "Tannenwälder, klare Bäche und kleine Dörfer mit alten Bauernhäusern prägen die Landschaft. "
                "Wer früh am Morgen aufbricht, kann auf den Höhenwegen oft über einem Meer aus Nebel laufen "
                "und die Sonne über den Hügeln aufgehen sehen.",
                "Für eine längere Wanderung sollte man feste Schuhe, ausreichend Wasser und eine gute Karte "
                "mitnehmen. Das Wetter kann sich in den Bergen schnell ändern, deshalb gehört auch eine "
                "Regenjacke in jeden Rucksack. Viele Gasthäuser entlang der Wege bieten regionale Gerichte "
                "an, zum Beispiel Flammkuchen oder die berühmte Schwarzwälder Kirschtorte.",
            ]),
        ],
    },
    "fr": {
        "charset": "utf-8",
        "domain": "lejournaldesvoisins.fr",
        "site": "Le Journal des Voisins",
        "nav": ["Accueil", "Quartier", "Culture", "Loisirs", "Contact"],
        "cookie": "Ce site utilise des cookies pour améliorer votre expérience de navigation.",
        "accept": "Tout accepter",
        "footer": ["Mentions légales", "Politique de confidentialité", "Plan du site"],
        "rights": "Tous droits réservés.",
        "related": "À lire aussi",
        "byline": "Publié le",
        "articles": [
            ("La boulangerie du quartier", [
                "La boulangerie de notre quartier ouvre ses portes chaque matin à six heures. Avant l'aube, "
                "le boulanger prépare déjà la pâte, façonne les baguettes et surveille la cuisson des "
                "croissants. Lorsque les premiers clients arrivent, l'odeur du pain chaud remplit toute la "
                "rue et attire même les passants pressés qui se rendent à la gare.",
                "Au fil des années, la boutique est devenue un lieu de rencontre pour les habitants. On y "
                "échange des nouvelles, on commente la météo et on découvre les pâtisseries de saison, comme "
                "la galette des rois en janvier ou les tartes aux fraises au début de l'été. Beaucoup de "
                "familles y achètent leur pain depuis plusieurs générations.",
            ]),
            ("Le vélo en ville", [
                "De plus en plus de citadins choisissent le vélo pour se déplacer au quotidien. Les nouvelles "
                "pistes cyclables permettent de traverser la ville rapidement et en toute sécurité, sans "
                "dépendre des embouteillages ni des horaires des transports en commun. Le vélo est aussi un "
                "excellent moyen de rester en forme sans y consacrer beaucoup de temps.",
                "Avant de partir, il est conseillé de vérifier la pression des pneus, le fonctionnement des "
                "freins et l'éclairage. Un bon antivol est indispensable, car les vols restent fréquents dans "
                "les grandes villes. Enfin, porter un casque et des vêtements visibles réduit nettement les "
                "risques d'accident, surtout le soir et pendant l'hiver.",
            ]),
        ],
    },
    "es": {
        "charset": "utf-8",
        "domain": "elrincondelpueblo.es",
        "site": "El Rincón del Pueblo",
        "nav": ["Inicio", "Noticias", "Cultura", "Ocio", "Contacto"],
        "cookie": "Utilizamos cookies propias y de terceros para mejorar nuestros servicios.",
        "accept": "Aceptar todas",
        "footer": ["Aviso legal", "Política de privacidad", "Política de cookies"],
        "rights": "Todos los derechos reservados.",
        "related": "También te puede interesar",
        "byline": "Publicado el",
        "articles": [
            ("El mercado de los sábados", [
                "Cada sábado por la mañana, la plaza principal del pueblo se llena de puestos de frutas, "
                "verduras, quesos y flores. Los agricultores de la comarca llegan muy temprano para montar "
                "sus mesas y ofrecer los productos que han cosechado durante la semana. Para muchos vecinos, "
                "ir al mercado es una costumbre que combina las compras con una charla tranquila.",
                "Además de los alimentos frescos, en el mercado se pueden encontrar artesanías, miel de la "
                "sierra y pan hecho en horno de leña. Los precios suelen ser razonables y los vendedores "
                "siempre están dispuestos a explicar de dónde viene cada producto. Al mediodía, muchas "
                "familias terminan la visita tomando un café en alguna de las terrazas cercanas.",
            ]),
            ("Cómo cuidar las plantas de interior", [
                "Las plantas de interior alegran cualquier casa, pero necesitan algunos cuidados básicos para "
                "crecer sanas. Lo más importante es colocarlas en un lugar con suficiente luz natural, aunque "
                "la mayoría no soporta el sol directo durante muchas horas. También conviene girar las "
                "macetas de vez en cuando para que crezcan de forma equilibrada.",
                "El error más común es regar demasiado. Antes de añadir agua, es mejor tocar la tierra con "
                "los dedos y comprobar si está seca. En invierno las plantas crecen más despacio y necesitan "
                "menos riego, mientras que en primavera agradecen un poco de abono cada dos o tres semanas.",
            ]),
        ],
    },
    "zh": {
        "charset": "gb2312",
        "domain": "shenghuo-xinwen.cn",
        "site": "生活新闻网",
        "nav": ["首页", "新闻", "文化", "生活", "联系我们"],
        "cookie": "本网站使用缓存文件来改善您的浏览体验。",
        "accept": "同意",
        "footer": ["关于我们", "隐私政策", "网站地图"],
        "rights": "版权所有。",
        "related": "相关文章",
        "byline": "发布日期",
        "articles": [
            ("春节的传统", [
                "春节是中国最重要的传统节日，一般在农历正月初一。节日前几天，人们忙着打扫房子、购买年货、"
                "贴春联和挂灯笼。很多在外地工作的人也会提前买好车票，无论路途多远，都希望能够回家和家人团聚。",
                "除夕晚上，全家人围坐在一起吃年夜饭。北方人喜欢包饺子，南方人则常常准备年糕和鱼，寓意生活"
                "年年有余。吃完饭以后，大家一起看电视节目、聊天，等到午夜十二点的时候放鞭炮，迎接新年的到来。",
            ]),
            ("城市里的自行车", [
                "近年来，越来越多的城市居民选择骑自行车上班。共享单车的出现让出行变得更加方便，人们只要用"
                "手机扫一扫，就可以在路边找到一辆车。骑车不但可以避开堵车，还能锻炼身体，减少空气污染。",
                "不过，骑车的时候也要注意安全。骑车人应该遵守交通规则，不闯红灯，不在人行道上快速骑行。"
                "晚上出门最好穿颜色鲜艳的衣服，并且检查车灯是否正常。只有每个人都养成良好的习惯，城市交通"
                "才会更加顺畅。",
            ]),
        ],
    },
    "ru": {
        "charset": "windows-1251",
        "domain": "derevenskie-zametki.ru",
        "site": "Деревенские заметки",
        "nav": ["Главная", "Новости", "Культура", "Досуг", "Контакты"],
        "cookie": "Мы используем файлы cookie, чтобы сделать сайт удобнее для вас.",
        "accept": "Принять",
        "footer": ["О проекте", "Политика конфиденциальности", "Карта сайта"],
        "rights": "Все права защищены.",
        "related": "Читайте также",
        "byline": "Опубликовано",
        "articles": [
            ("Зима в деревне", [
                "Зимой в деревне становится особенно тихо. Снег покрывает поля и крыши домов, а по утрам над "
                "трубами поднимается белый дым. Жители встают рано, чтобы расчистить дорожки, принести дрова "
                "и накормить животных. Дети после школы катаются на санках с высокого холма за рекой.",
                "Вечерами семьи собираются за большим столом, пьют горячий чай с вареньем и рассказывают "
                "истории. Старики вспоминают, какими суровыми были зимы в их молодости, когда дороги "
                "заносило так, что до соседнего села можно было добраться только на лыжах. Такие вечера "
                "надолго остаются в памяти.",
            ]),
            ("Как читать больше книг", [
                "Многие люди хотят читать больше, но жалуются на нехватку времени. Опыт показывает, что "
                "достаточно всего двадцати минут в день, чтобы за год прочитать больше десяти книг. Удобнее "
                "всего читать в транспорте, перед сном или во время обеденного перерыва, когда телефон можно "
                "ненадолго отложить.",
                "Чтобы чтение стало привычкой, полезно всегда носить с собой книгу и записывать интересные "
                "мысли. Не стоит заставлять себя дочитывать скучное произведение до конца: лучше выбрать то, "
                "что действительно увлекает. Обсуждение прочитанного с друзьями также помогает лучше "
                "запомнить содержание.",
            ]),
        ],
    },
}

LOREM = [
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
    "ex ea commodo consequat.",
    "Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur. "
    "Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt mollit anim id est "
    "laborum.",
    "Sed ut perspiciatis unde omnis iste natus error sit voluptatem accusantium doloremque laudantium, totam "
    "rem aperiam, eaque ipsa quae ab illo inventore veritatis et quasi architecto beatae vitae dicta sunt "
    "explicabo.",
]

SPAM_KEYWORDS = [
    "cheap flights", "cheap hotels", "best price", "discount travel", "last minute deals", "buy now",
    "free shipping", "lowest price guaranteed", "limited offer", "best deals online", "cheap insurance",
    "payday loans", "fast cash", "weight loss pills", "cheap watches", "replica bags", "online pharmacy",
]

GAMBLING = [
    "Online casino with the biggest jackpot bonus! Play slots, poker, roulette and blackjack for real money.",
    "Claim 200 free spins now, no deposit casino bonus, instant withdrawal, best betting odds guaranteed.",
    "Sports betting tips, live casino, jackpot slots, win big today at the number one online casino.",
    "Casino casino casino bonus bonus jackpot jackpot free spins free spins poker slots betting.",
]

ADULT = [
    "xxx hot porn videos free sex cams live now, click to watch xxx porn free.",
    "Free porn, xxx sex videos and adult cams, hot singles waiting for you, xxx xxx xxx.",
]

REPEATED_LINE = "Buy now and save 50% on all products today only!"

SHORT_PAGES = [("Coming soon", "Coming soon."), ("Under construction", "This page is under construction."),
               ("Untitled", "Hello world!")]

CLICK_HERE = ["Click here", "Click here to download", "Click here for free gift", "Click here now",
              "Download here", "Click here to win", "Best offer click here", "Click here to register"]

SPAM_DOMAINS = ["best-deals-4u.biz", "top10-offers.info", "mega-savings-now.xyz", "freestuff-online.top"]

BLOCKLIST_DOMAIN = "royal-casino-bets.com"

# Near-duplicate word edits: word -> replacement (applied to a few occurrences).
SYNONYMS = {
    "return": "give back", "returns": "gives back", "value": "result", "object": "instance",
    "function": "routine", "default": "standard", "string": "text", "file": "document",
    "number": "count", "list": "sequence", "method": "operation", "used": "employed",
    "called": "invoked", "new": "fresh", "given": "specified", "must": "should", "data": "content",
    "create": "build", "created": "built", "argument": "parameter", "arguments": "parameters",
    "error": "failure", "true": "truthy", "false": "falsy", "name": "label", "use": "employ",
    "specified": "given", "optional": "not required", "instance": "object", "called.": "invoked.",
}

ADDED_SENTENCES = [
    "This behaviour has been stable across many releases.",
    "Readers of the previous edition asked for a clearer explanation of this point.",
    "The same idea comes up again in later chapters.",
    "Keep this in mind when reading the examples below.",
]

# English boilerplate pieces.
EN_SITES: list[dict[str, Any]] = [
    {"domain": "pythonnotes.org", "site": "Python Notes", "layout": "semantic",
     "sections": ["guides", "reference", "howto"]},
    {"domain": "devdocshub.net", "site": "DevDocs Hub", "layout": "divs", "sections": ["docs", "articles"]},
    {"domain": "stdlib-companion.com", "site": "The Stdlib Companion", "layout": "semantic",
     "sections": ["modules", "library"]},
    {"domain": "codecraft-tutorials.io", "site": "CodeCraft Tutorials", "layout": "divs",
     "sections": ["tutorials", "blog"]},
    {"domain": "bytesizedpython.dev", "site": "Byte Sized Python", "layout": "semantic",
     "sections": ["posts", "notes"]},
    {"domain": "osdigest.org", "site": "Open Source Digest", "layout": "divs", "sections": ["digest", "library"]},
]
EN_NAV = ["Home", "Tutorials", "Reference", "Blog", "About", "Contact"]
EN_FOOTER = ["About us", "Privacy Policy", "Terms of Use", "Cookie Policy", "Contact", "Sitemap"]
AUTHORS = ["Maria Keller", "James Whitfield", "Aiko Tanaka", "Samuel Okoro", "Lucia Ferreira", "Tom Brennan",
           "Priya Raman", "Olga Novak"]
COMMENTS = ["Thanks, this helped a lot!", "Great explanation, bookmarked.", "Could you write a follow-up on this?",
            "I finally understand how this works.", "Very clear, thank you for sharing."]

# Personal data planted into a few pages (fictitious names; phone numbers in the 555-01xx range reserved
# for fiction and the UK drama range; IP addresses are random public addresses).
PII_PEOPLE = [("Jane", "Doe"), ("Carlos", "Mendez"), ("Wei", "Zhang"), ("Anna", "Schmidt"), ("Omar", "Haddad"),
              ("Emily", "Clarke"), ("Noah", "Fischer"), ("Sara", "Lindqvist")]
PII_MAIL_DOMAINS = ["mailbox.example.com", "devmail.net", "fastpost.org"]
PII_TEMPLATES = [
    "For questions about this guide, write to {email} or call {phone} on weekdays. The example server used "
    "in the screenshots ran at {ip} on our office network.",
    "If you find a mistake, please contact the editor, {name}, at {email} or by phone at {phone}. Access "
    "logs showed requests from {ip} while we tested the examples.",
]
