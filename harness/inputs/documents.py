"""Long documents generated locally, seeded, that read like the real thing, and the questions a user would ask of
them: a commercial contract (numbered clauses), a medical record (visits, labs, medications) and an application
log (timestamps, levels, stack traces). Only the text is made here; harness/inputs/exact.py cuts it to a length."""

from __future__ import annotations

import datetime as dt
import re

import numpy as np

COMPANIES = ["Northwind Logistics Inc.", "Acme Analytics LLC", "Bluefin Health Systems", "Corvid Software GmbH",
             "Helios Energy Partners", "Juniper Retail Group", "Kestrel Manufacturing Co.", "Orion Data Services"]
STATES = ["Delaware", "New York", "California", "Texas", "Massachusetts", "Illinois"]
CLAUSES = {
    "Definitions": ["\"Confidential Information\" means any non-public information disclosed by either party, "
                    "whether orally or in writing, that is designated as confidential or that reasonably should be "
                    "understood to be confidential.", "\"Deliverables\" means the reports, software and other "
                    "materials the Provider delivers under a Statement of Work.", "\"Service Levels\" means the "
                    "availability and response targets set out in Schedule {n}."],
    "Services": ["The Provider shall perform the services described in each Statement of Work with the skill and "
                 "care of a competent provider of similar services.", "The Provider shall assign a named account "
                 "manager within {days} business days of the Effective Date."],
    "Fees and Payment": ["The Customer shall pay the fees set out in Schedule {n} within {days} days of receipt "
                         "of a correct invoice.", "Late payments bear interest at {pct}% per annum above the base "
                         "rate.", "Fees are exclusive of value added tax and similar taxes."],
    "Term and Termination": ["This Agreement begins on the Effective Date and continues for {years} years unless "
                             "terminated earlier.", "Either party may terminate this Agreement for convenience on "
                             "{days} days' written notice.", "Either party may terminate immediately if the other "
                             "commits a material breach that is not remedied within {days} days."],
    "Confidentiality": ["Each party shall keep the other's Confidential Information confidential for {years} years "
                        "after termination.", "Disclosure is permitted where required by law, provided the "
                        "disclosing party gives prompt notice where lawful."],
    "Intellectual Property": ["All intellectual property rights in the Deliverables vest in the Customer on "
                              "payment in full.", "The Provider retains ownership of its pre-existing materials and "
                              "grants the Customer a perpetual licence to use them as part of the Deliverables."],
    "Limitation of Liability": ["Neither party's total liability in any contract year shall exceed {pct}0% of the "
                                "fees paid in the preceding twelve months.", "Neither party is liable for indirect "
                                "or consequential loss, including loss of profit."],
    "Data Protection": ["The Provider shall process personal data only on the Customer's documented instructions.",
                        "The Provider shall notify the Customer of a personal data breach within {hours} hours of "
                        "becoming aware of it."],
    "Governing Law": ["This Agreement is governed by the laws of the State of {state}.", "The courts of {state} "
                      "have exclusive jurisdiction over any dispute arising from this Agreement."],
}
CONTRACT_QUESTIONS = [
    "What notice period applies to termination for convenience?",
    "Which state's law governs this agreement?",
    "What is the cap on each party's liability?",
    "Within how many days must the Customer pay an invoice?",
    "Who owns the intellectual property in the deliverables?",
    "How long do the confidentiality obligations last after termination?",
    "How quickly must the Provider report a personal data breach?",
    "What interest rate applies to late payments?",
    "Summarize clause {clause} in two sentences.",
    "Does clause {clause} conflict with any other clause of the agreement?",
]

DRUGS = [("Metformin", "500 mg", "PO BID"), ("Lisinopril", "10 mg", "PO daily"),
         ("Atorvastatin", "20 mg", "PO nightly"), ("Levothyroxine", "75 mcg", "PO daily"),
         ("Amlodipine", "5 mg", "PO daily"), ("Omeprazole", "20 mg", "PO daily"), ("Sertraline", "50 mg", "PO daily"),
         ("Albuterol", "90 mcg", "2 puffs q4-6h PRN")]
PLANS = ["continue current regimen", "titrate dose and recheck in 3 months", "refer to dietitian",
         "repeat labs in 6 weeks"]
LABS = [("HbA1c", "%", 5.0, 9.5, "4.0-5.6"), ("Creatinine", "mg/dL", 0.6, 1.8, "0.6-1.2"),
        ("LDL cholesterol", "mg/dL", 60, 190, "<100"), ("TSH", "mIU/L", 0.3, 6.5, "0.4-4.0"),
        ("Hemoglobin", "g/dL", 10.5, 16.0, "12.0-15.5"), ("Potassium", "mmol/L", 3.2, 5.4, "3.5-5.0")]
COMPLAINTS = ["fatigue and increased thirst", "follow-up of hypertension", "intermittent chest tightness on exertion",
              "cough for two weeks", "medication review", "dizziness when standing", "low back pain after lifting"]
DEPARTMENTS = ["Primary Care", "Cardiology", "Endocrinology", "Pulmonology", "Emergency Department"]
MEDICAL_QUESTIONS = [
    "What was the patient's most recent HbA1c, and how has it changed?",
    "List the current medications with their doses.",
    "Which allergies are documented?",
    "Has the patient's blood pressure improved across visits?",
    "Which lab results were outside the reference range at the last visit?",
    "Why was the medication changed at the visit on {date}?",
    "Summarize the visit on {date} for a referral letter.",
    "What follow-up was planned after the most recent visit?",
]

SERVICES = ["orders", "payments", "inventory", "auth", "shipping", "search"]
LOG_EVENTS = [("INFO", "Order {id} created for customer {cust} in {ms} ms"),
              ("INFO", "GET /api/v2/{svc}/{id} 200 {ms}ms"), ("DEBUG", "cache hit for key {svc}:{id}"),
              ("WARN", "Slow query on table {svc}_items took {ms} ms"),
              ("WARN", "Retrying call to payment gateway (attempt {n}/3)"),
              ("INFO", "Connection pool stats: active={n}, idle={cust}, waiting=0"),
              ("ERROR", "Payment gateway timed out after {ms} ms for order {id}")]
LOG_QUESTIONS = [
    "What is the first ERROR in this log, and what caused it?",
    "How many times did the payment gateway time out?",
    "Which service logged the most warnings?",
    "What happened just before the exception at {time}?",
    "Is there a pattern in the slow queries? Which table is affected?",
    "Write a short incident summary for the errors in this log.",
]
STACKS = [["java.lang.NullPointerException: Cannot invoke \"Customer.getTier()\" because \"customer\" is null",
           "\tat com.acme.{svc}.PricingService.price(PricingService.java:{line})",
           "\tat com.acme.{svc}.OrderService.create(OrderService.java:88)",
           "\tat org.springframework.web.servlet.FrameworkServlet.service(FrameworkServlet.java:897)"],
          ["Traceback (most recent call last):", "  File \"/srv/{svc}/worker.py\", line {line}, in handle",
           "    result = client.charge(order.total)", "  File \"/srv/{svc}/gateway.py\", line 57, in charge",
           "    raise GatewayTimeout(f\"no answer after {{timeout}} s\")",
           "gateway.GatewayTimeout: no answer after 30 s"]]


def generate(kind: str, rng: np.random.Generator, min_chars: int) -> str:
    """A seeded document of the kind, at least min_chars long."""
    return {"contract": _contract, "medical": _medical, "log": _log}[kind](rng, min_chars)


def questions(kind: str, rng: np.random.Generator, n: int, document: str) -> list[str]:
    """n different questions (while there are enough) a user would ask of this kind of document."""
    pool = {"contract": CONTRACT_QUESTIONS, "medical": MEDICAL_QUESTIONS, "log": LOG_QUESTIONS}[kind]
    order = [pool[i] for i in rng.permutation(len(pool))]
    picked = [order[i % len(order)] for i in range(n)]
    # Placeholders name something the document really has: a clause number, a visit date, a logged time.
    clauses = re.findall(r"^(\d+\.\d+) ", document, flags=re.MULTILINE)
    dates = [line.split()[1] for line in document.splitlines() if line.startswith("VISIT ")]
    times = [line[11:19] for line in document.splitlines() if " ERROR " in line]
    fill = {"clause": clauses or ["1.1"], "date": dates or ["the first visit"], "time": times or ["the first error"]}
    return [q.format(**{k: v[int(rng.integers(len(v)))] for k, v in fill.items()}) for q in picked]


def _contract(rng: np.random.Generator, min_chars: int) -> str:
    a, b = rng.choice(COMPANIES, size=2, replace=False)
    state = rng.choice(STATES)
    start = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(700)))
    out = [f"MASTER SERVICES AGREEMENT\n\nThis Master Services Agreement (the \"Agreement\") is made on "
           f"{start:%B %d, %Y} (the \"Effective Date\") between {a}, a {state} corporation (the \"Provider\"), and "
           f"{b} (the \"Customer\").\n"]
    size, article = len(out[0]), 0
    while size < min_chars:
        for title, sentences in CLAUSES.items():
            article += 1
            lines = [f"\n{article}. {title.upper()}"]
            for sub in range(1, int(rng.integers(2, 5)) + 1):
                k = min(int(rng.integers(1, 3)), len(sentences))
                text = " ".join(rng.choice(sentences, size=k, replace=False))
                lines.append(f"{article}.{sub} " + text.format(
                    n=int(rng.integers(1, 6)), days=int(rng.choice([10, 15, 30, 45, 60, 90])),
                    pct=int(rng.integers(2, 9)), years=int(rng.integers(1, 6)), hours=int(rng.choice([24, 48, 72])),
                    state=state))
            block = "\n".join(lines)
            out.append(block)
            size += len(block)
            if size >= min_chars:
                break
    return "\n".join(out)


def _medical(rng: np.random.Generator, min_chars: int) -> str:
    day = dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(900)))
    meds = [DRUGS[i] for i in rng.choice(len(DRUGS), size=3, replace=False)]
    out = [f"PATIENT RECORD\nName: Patient {int(rng.integers(1000, 9999))}   MRN: {int(rng.integers(10**7, 10**8))}   "
           f"DOB: {1940 + int(rng.integers(60))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}\n"
           f"Allergies: {rng.choice(['penicillin (rash)', 'sulfonamides (hives)', 'none known', 'latex'])}\n"
           f"Problem list: type 2 diabetes mellitus; essential hypertension; hyperlipidemia\n"]
    size = len(out[0])
    while size < min_chars:
        day += dt.timedelta(days=int(rng.integers(20, 120)))
        systolic, diastolic = int(rng.integers(112, 158)), int(rng.integers(68, 96))
        labs = "\n".join(f"  {name}: {rng.uniform(lo, hi):.1f} {unit} (ref {ref})"
                         for name, unit, lo, hi, ref in [LABS[i] for i in rng.choice(len(LABS), 3, replace=False)])
        if rng.random() < 0.3:  # a medication change, as real records have
            meds[int(rng.integers(len(meds)))] = DRUGS[int(rng.integers(len(DRUGS)))]
        med_list = "\n".join(f"  {n} {dose} {route}" for n, dose, route in meds)
        visit = (f"\nVISIT {day:%Y-%m-%d} {rng.choice(DEPARTMENTS)}\nChief complaint: {rng.choice(COMPLAINTS)}\n"
                 f"Vitals: BP {systolic}/{diastolic} mmHg, HR {int(rng.integers(58, 104))}, "
                 f"Temp {rng.uniform(36.2, 37.9):.1f} C, SpO2 {int(rng.integers(93, 100))}%\n"
                 f"Labs:\n{labs}\nMedications:\n{med_list}\n"
                 f"Assessment: {'stable' if systolic < 140 else 'blood pressure above target'}; "
                 f"{'glycemic control improving' if rng.random() < 0.5 else 'glycemic control not at goal'}.\n"
                 f"Plan: {rng.choice(PLANS)}.\n")
        out.append(visit)
        size += len(visit)
    return "".join(out)


def _log(rng: np.random.Generator, min_chars: int) -> str:
    t = dt.datetime(2026, 3, 14, 9, 0, 0) + dt.timedelta(seconds=int(rng.integers(3600)))
    out, size = [], 0
    while size < min_chars:
        t += dt.timedelta(milliseconds=int(rng.integers(1, 4000)))
        svc = str(rng.choice(SERVICES))
        level, msg = LOG_EVENTS[int(rng.choice(len(LOG_EVENTS), p=[.3, .3, .15, .08, .07, .06, .04]))]
        worker = f"{svc}-worker-{int(rng.integers(1, 9))}"
        line = (f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond // 1000:03d}Z {level:<5} [{worker}] com.acme.{svc} - "
                + msg.format(id=int(rng.integers(10**4, 10**5)), cust=int(rng.integers(100, 999)),
                             ms=int(rng.integers(3, 30000)), svc=svc, n=int(rng.integers(1, 4))))
        if level == "ERROR" and rng.random() < 0.6:
            stack = STACKS[int(rng.integers(len(STACKS)))]
            line += "\n" + "\n".join(s.format(svc=svc, line=int(rng.integers(40, 400))) for s in stack)
        out.append(line)
        size += len(line) + 1
    return "\n".join(out)
