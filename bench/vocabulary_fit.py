"""Does MiniLM's tokenizer read these texts? ``data.checks.vocabulary_fit`` (the check every run's data card makes)
on the built-in and held-out data sets and on a few support-ticket sentences per language, to place its
thresholds (``UNKNOWN_SHARE``, ``TOKENS_PER_CHAR``).

    PYTHONPATH=src .venv/bin/python bench/heldout_data.py --out /tmp/heldout
    PYTHONPATH=src .venv/bin/python bench/vocabulary_fit.py --heldout /tmp/heldout
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graftune.data.checks import vocabulary_fit
from graftune.data.sources import load_data
from graftune.zoo import load_base

SETS = ("bbc-news", "trec", "rotten-tomatoes", "sms-spam", "convention-2012")
HELDOUT = ("tweets-sentiment", "amazon-reviews", "chinese-novels")
#: the same two support tickets ("my bill is too high, please check last month's charge"; "since the update the
#: internet no longer works") in other languages, and two kinds of non-prose
SENTENCES = {
    "german": ["Meine Rechnung ist zu hoch, bitte prüfen Sie die Abbuchung vom letzten Monat.",
               "Seit dem Update funktioniert das Internet nicht mehr zuverlässig."],
    "french": ["Ma facture est trop élevée, pouvez-vous vérifier le prélèvement du mois dernier ?",
               "Depuis la mise à jour, la connexion internet ne fonctionne plus."],
    "spanish": ["Mi factura es demasiado alta, ¿pueden revisar el cargo del mes pasado?",
                "Desde la actualización, el internet ya no funciona bien."],
    "turkish": ["Faturam çok yüksek, lütfen geçen ayın ödemesini kontrol edin."],
    "russian": ["Мой счёт слишком большой, проверьте, пожалуйста, списание за прошлый месяц.",
                "После обновления интернет больше не работает."],
    "greek": ["Ο λογαριασμός μου είναι πολύ υψηλός, παρακαλώ ελέγξτε τη χρέωση."],
    "arabic": ["فاتورتي مرتفعة جدا، يرجى التحقق من الخصم للشهر الماضي."],
    "hindi": ["मेरा बिल बहुत ज़्यादा है, कृपया पिछले महीने की कटौती जाँचें।"],
    "japanese": ["請求額が高すぎます。先月の引き落としを確認してください。"],
    "korean": ["청구서가 너무 많이 나왔습니다. 지난달 출금을 확인해 주세요."],
    "numbers and codes": ["Order 48213 shipped 2024-05-01, total $1,234.56 ref A7X-99"],
    "python source": ["def f(x): return x**2 + 3*x - 1  # square"],
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--heldout", default="/tmp/heldout", help="bench/heldout_data.py's folder (skipped if absent)")
    a = p.parse_args()
    tokenizer = load_base(a.model, task="text-classification").tokenizer
    texts = {name: load_data(name).inputs for name in SETS}
    texts.update({name: load_data(str(Path(a.heldout) / f"{name}.csv")).inputs for name in HELDOUT
                  if (Path(a.heldout) / f"{name}.csv").is_file()})
    texts.update(SENTENCES)
    print("| texts | unknown tokens | tokens per character | reads |\n|---|---|---|---|")
    for name, sample in texts.items():
        fit = vocabulary_fit(tokenizer, sample)
        print(f"| {name} | {fit['unknown_share']:.1%} | {fit['tokens_per_char']:.2f} | {'yes' if fit['reads'] else 'no'} |")


if __name__ == "__main__":
    main()
