//! `tessera demo --load`: shop traffic through the gateway (browse, cart, checkout with
//! idempotency keys) with a live progress line and a summary table, optional chaos
//! (SIGKILL a random replica every few seconds, then restart it), and the consistency
//! check `tessera demo --verify` runs: every order is confirmed with its stock reserved
//! and its payment taken, or cancelled with both released; stock and balances add up.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::demo::Fleet;
use crate::http::Http;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// How long --load runs (Go duration).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Requests per second to aim for (default: as fast as --concurrency allows).
    #[arg(long)]
    rate: Option<u32>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Shoppers (each registers and logs in once).
    #[arg(long, default_value_t = 20)]
    shoppers: u32,
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    tessera_core::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Action {
    Browse,
    Product,
    AddToCart,
    ViewCart,
    Checkout,
    Orders,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Browse => "browse catalog",
            Action::Product => "view product",
            Action::AddToCart => "add to cart",
            Action::ViewCart => "view cart",
            Action::Checkout => "checkout",
            Action::Orders => "list orders",
        }
    }

    /// Safe to repeat: reads, and checkouts (sent with an `Idempotency-Key`). Adding to
    /// the cart is a plain POST: a replica killed while handling it fails it.
    fn idempotent(self) -> bool {
        self != Action::AddToCart
    }

    fn pick() -> Action {
        match fastrand::u32(0..100) {
            0..35 => Action::Browse,
            35..55 => Action::Product,
            55..75 => Action::AddToCart,
            75..83 => Action::ViewCart,
            83..95 => Action::Checkout,
            _ => Action::Orders,
        }
    }
}

const PRODUCT_IDS: &[&str] = &[
    "espresso", "filter", "mug", "scale", "tamper", "kettle", "grinder", "machine",
];

#[derive(Default)]
struct Stats {
    /// Per action: latencies in microseconds of answered requests.
    latencies: HashMap<Action, Vec<u32>>,
    /// Per action: failed requests (5xx or no answer).
    errors: HashMap<Action, u64>,
    /// Per action: requests refused with a 4xx.
    rejected: HashMap<Action, u64>,
    /// Checkout retries with the same idempotency key.
    retries: u64,
    orders: BTreeMap<String, u64>,
    reasons: BTreeMap<String, u64>,
    last_error: Option<String>,
}

impl Stats {
    fn total(&self) -> u64 {
        self.latencies.values().map(|v| v.len() as u64).sum::<u64>()
            + self.errors.values().sum::<u64>()
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

struct Shopper {
    token: String,
}

/// Runs the load; `true` when the consistency check passed.
pub async fn run(
    http: &Http,
    gw: &str,
    registry: &str,
    args: &LoadArgs,
    admin_token: &str,
    mut chaos: Option<&mut Fleet>,
) -> Result<bool, String> {
    let run_id = format!("{:06x}", fastrand::u32(..0xff_ffff));
    println!(
        "load: {} shoppers, concurrency {}, {}{}{}",
        args.shoppers,
        args.concurrency,
        tessera_core::GoDuration(args.duration),
        args.rate
            .map(|r| format!(", {r} req/s"))
            .unwrap_or_default(),
        if chaos.is_some() { ", chaos on" } else { "" }
    );
    let mut shoppers = Vec::new();
    for i in 0..args.shoppers.max(1) {
        let email = format!("shopper-{run_id}-{i}@shop.test");
        let creds = json!({"email": email, "password": "load-test-password"});
        let (s, v) = http
            .post(&format!("{gw}/api/users/register"), None, &creds, None)
            .await?;
        if s != 201 {
            return Err(format!("cannot register {email}: {s} {v}"));
        }
        let (s, v) = http
            .post(&format!("{gw}/api/users/login"), None, &creds, None)
            .await?;
        let token = v["token"]
            .as_str()
            .filter(|_| s == 200)
            .ok_or(format!("cannot log in {email}: {s} {v}"))?;
        // Enough money for a run: checkouts fail for want of stock (the espresso
        // machine is scarce) rather than of funds.
        let user = v["user"]["id"].as_str().unwrap_or_default();
        let url = format!("{gw}/api/payments/accounts/{user}/deposit");
        let (s, v) = http
            .post(
                &url,
                Some(admin_token),
                &json!({"amount_cents": 2_000_000}),
                None,
            )
            .await?;
        if s != 200 {
            return Err(format!("cannot fund {email}: {s} {v}"));
        }
        shoppers.push(Shopper {
            token: token.to_owned(),
        });
    }
    // Restock (all but the espresso machine, which stays scarce) so a long run keeps
    // selling instead of turning into a stream of "insufficient stock".
    for p in PRODUCT_IDS.iter().filter(|p| **p != "machine") {
        let url = format!("{gw}/api/catalog/products/{p}");
        let (s, v) = http
            .send(
                "PUT",
                &url,
                Some(admin_token),
                Some(&json!({"add_stock": 20_000})),
                None,
            )
            .await?;
        if s != 200 {
            return Err(format!("cannot restock {p}: {s} {v}"));
        }
    }
    let shoppers = Arc::new(shoppers);
    let stats = Arc::new(Mutex::new(Stats::default()));
    let started = Instant::now();
    let deadline = started + args.duration;
    let per_worker_gap = args
        .rate
        .filter(|r| *r > 0)
        .map(|r| Duration::from_secs_f64(f64::from(args.concurrency.max(1)) / f64::from(r)));
    let mut workers = Vec::new();
    for w in 0..args.concurrency.max(1) {
        let (http, gw, shoppers, stats) =
            (http.clone(), gw.to_owned(), shoppers.clone(), stats.clone());
        let run_id = run_id.clone();
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut next = tokio::time::Instant::now();
            while Instant::now() < deadline {
                if let Some(gap) = per_worker_gap {
                    tokio::time::sleep_until(next).await;
                    next += gap;
                }
                n += 1;
                let shopper = &shoppers[fastrand::usize(..shoppers.len())];
                let key = format!("{run_id}-{w}-{n}");
                step(&http, &gw, shopper, Action::pick(), &key, &stats).await;
            }
        }));
    }

    let tty = std::io::stdout().is_terminal();
    let mut chaos_at = started + Duration::from_secs(3);
    let mut killed: Option<(usize, Instant)> = None;
    let mut kills = 0u32;
    let mut last_total = 0u64;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(fleet) = chaos.as_deref_mut() {
            if let Some((i, at)) = killed
                && at.elapsed() >= Duration::from_secs(1)
            {
                fleet.services[i].spawn()?;
                killed = None;
            }
            if killed.is_none() && Instant::now() >= chaos_at && !fleet.services.is_empty() {
                let i = fastrand::usize(..fleet.services.len());
                fleet.services[i].kill().await;
                println!("\nchaos: killed {} (SIGKILL)", fleet.services[i].name);
                killed = Some((i, Instant::now()));
                kills += 1;
                chaos_at = Instant::now() + Duration::from_secs(3);
            }
        }
        let s = stats.lock().unwrap_or_else(|p| p.into_inner());
        let total = s.total();
        let mut all: Vec<u32> = s.latencies.values().flatten().copied().collect();
        all.sort_unstable();
        let line = format!(
            "t={:>3}s  {:>6} req/s  errors {:<4} p50 {:>6.1} ms  p99 {:>7.1} ms  orders: {} confirmed, {} cancelled",
            started.elapsed().as_secs(),
            total - last_total,
            s.error_count(),
            percentile(&all, 0.5),
            percentile(&all, 0.99),
            s.orders.get("confirmed").unwrap_or(&0),
            s.orders.get("cancelled").unwrap_or(&0),
        );
        last_total = total;
        if tty {
            print!("\r{line}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        } else {
            println!("{line}");
        }
    }
    for w in workers {
        let _ = w.await;
    }
    if let (Some(fleet), Some((i, _))) = (chaos, killed) {
        fleet.services[i].spawn()?;
    }
    let elapsed = started.elapsed();
    println!();
    {
        let s = stats.lock().unwrap_or_else(|p| p.into_inner());
        println!(
            "\n{:<16} {:>9} {:>8} {:>9} {:>9} {:>9}",
            "action", "requests", "errors", "4xx", "p50 ms", "p99 ms"
        );
        let mut all: Vec<u32> = Vec::new();
        let mut actions: Vec<&Action> = s.latencies.keys().chain(s.errors.keys()).collect();
        actions.sort();
        actions.dedup();
        for a in actions {
            let mut l = s.latencies.get(a).cloned().unwrap_or_default();
            l.sort_unstable();
            all.extend(&l);
            let errors = s.errors.get(a).copied().unwrap_or(0);
            println!(
                "{:<16} {:>9} {:>8} {:>9} {:>9.1} {:>9.1}",
                a.name(),
                l.len() as u64 + errors,
                errors,
                s.rejected.get(a).copied().unwrap_or(0),
                percentile(&l, 0.5),
                percentile(&l, 0.99)
            );
        }
        all.sort_unstable();
        println!(
            "{:<16} {:>9} {:>8} {:>9} {:>9.1} {:>9.1}   ({:.0} req/s over {})",
            "total",
            s.total(),
            s.error_count(),
            s.rejected.values().sum::<u64>(),
            percentile(&all, 0.5),
            percentile(&all, 0.99),
            s.total() as f64 / elapsed.as_secs_f64(),
            tessera_core::GoDuration(Duration::from_secs(elapsed.as_secs()))
        );
        let (mut safe, mut other) = (0, 0);
        for (a, n) in &s.errors {
            if a.idempotent() {
                safe += n;
            } else {
                other += n;
            }
        }
        println!("failed idempotent requests: {safe} (target 0); failed other requests: {other}");
        let orders: Vec<String> = s.orders.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let reasons: Vec<String> = s.reasons.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        println!(
            "checkouts: {} (sagas: {}){}; {} retried with the same Idempotency-Key",
            orders.join(", "),
            if reasons.is_empty() {
                "none compensated".to_owned()
            } else {
                format!("compensated because {}", reasons.join(", "))
            },
            if kills > 0 {
                format!("; chaos killed {kills} replicas")
            } else {
                String::new()
            },
            s.retries
        );
        if let Some(e) = &s.last_error {
            println!("last error: {e}");
        }
    }

    // Orders still pending settle within seconds (the reconciler finishes them).
    println!("\nchecking consistency ...");
    let settle_by = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let report = verify(registry).await?;
        if report.pending == 0 || Instant::now() > settle_by {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("{report}");
    Ok(report.ok())
}

async fn step(
    http: &Http,
    gw: &str,
    shopper: &Shopper,
    action: Action,
    key: &str,
    stats: &Mutex<Stats>,
) {
    let t = Some(shopper.token.as_str());
    let product = PRODUCT_IDS[fastrand::usize(..PRODUCT_IDS.len())];
    let started = Instant::now();
    let mut retries = 0;
    let result = match action {
        Action::Browse => http.get(&format!("{gw}/api/catalog/products"), None).await,
        Action::Product => {
            http.get(&format!("{gw}/api/catalog/products/{product}"), None)
                .await
        }
        Action::AddToCart => {
            let body = json!({"product_id": product, "quantity": fastrand::i64(1..3)});
            http.post(&format!("{gw}/api/cart/items"), t, &body, None)
                .await
        }
        Action::ViewCart => http.get(&format!("{gw}/api/cart"), t).await,
        Action::Orders => http.get(&format!("{gw}/api/orders"), t).await,
        Action::Checkout => {
            // Mostly a few cheap items, now and then the scarce espresso machine; half
            // from the cart, half explicit.
            let from_cart = fastrand::bool();
            let body = if from_cart {
                json!({})
            } else {
                let n = fastrand::usize(1..3);
                let items: Vec<Value> = (0..n)
                    .map(|_| {
                        let p = if fastrand::u32(0..10) == 0 {
                            "machine"
                        } else {
                            PRODUCT_IDS[fastrand::usize(..5)]
                        };
                        json!({"product_id": p, "quantity": 1})
                    })
                    .collect();
                json!({"items": items})
            };
            // A client that retries with the same key gets the same order, never two.
            let url = format!("{gw}/api/orders/checkout");
            let mut r = http.post(&url, t, &body, Some(key)).await;
            while retries < 3 && r.as_ref().map_or(true, |(s, _)| *s >= 500) {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                r = http.post(&url, t, &body, Some(key)).await;
            }
            // A shopper whose cart did not go through empties it and starts over (else
            // carts only grow, and every later checkout fails the same way).
            if from_cart
                && let Ok((_, v)) = &r
                && v["status"] == "cancelled"
            {
                let _ = http
                    .send("DELETE", &format!("{gw}/api/cart"), t, None, None)
                    .await;
            }
            r
        }
    };
    let micros = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
    s.retries += retries;
    match result {
        Ok((status, v)) if status < 500 => {
            s.latencies.entry(action).or_default().push(micros);
            if status >= 400 {
                *s.rejected.entry(action).or_default() += 1;
            }
            if action == Action::Checkout && status < 300 {
                let st = v["status"].as_str().unwrap_or("?").to_owned();
                if let Some(r) = v["reason"].as_str().filter(|_| st == "cancelled") {
                    *s.reasons.entry(r.to_owned()).or_default() += 1;
                }
                *s.orders.entry(st).or_default() += 1;
            }
        }
        Ok((status, v)) => {
            *s.errors.entry(action).or_default() += 1;
            s.last_error = Some(format!("{}: {status} {v}", action.name()));
        }
        Err(e) => {
            *s.errors.entry(action).or_default() += 1;
            s.last_error = Some(format!("{}: {e}", action.name()));
        }
    }
}

/// What `tessera demo --verify` found.
#[derive(Debug, Default)]
pub struct Report {
    pub confirmed: u64,
    pub cancelled: u64,
    pub pending: u64,
    pub products: usize,
    pub accounts: usize,
    pub mismatches: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "orders: {} confirmed, {} cancelled, {} pending; {} products and {} accounts checked",
            self.confirmed, self.cancelled, self.pending, self.products, self.accounts
        )?;
        if self.mismatches.is_empty() {
            write!(
                f,
                "consistent: every confirmed order has its stock reserved and its payment taken, every cancelled one has both released, and stock and balances add up"
            )
        } else {
            writeln!(f, "INCONSISTENT ({} problems):", self.mismatches.len())?;
            for m in self.mismatches.iter().take(50) {
                writeln!(f, "  - {m}")?;
            }
            Ok(())
        }
    }
}

/// Reads orders, reservations, charges, stock and balances straight from the services
/// (found through the registry) and checks them against each other.
pub async fn verify(registry: &str) -> Result<Report, String> {
    let reg = tessera::Registry::new(registry).with_wait(Duration::from_secs(10));
    let fetch = |service: &'static str, path: &'static str| {
        let client = tessera::ServiceClient::new(&reg, service);
        async move {
            client.watch().ready(Duration::from_secs(10)).await;
            client
                .get(path)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.json::<Value>())
                .map_err(|e| format!("{service}: {e}"))
        }
    };
    let orders = fetch("orders", "/internal/orders").await?;
    let catalog = fetch("catalog", "/internal/reservations").await?;
    let payments = fetch("payments", "/internal/charges").await?;
    let mut r = Report::default();

    let by = |v: &Value, list: &str| -> HashMap<String, Value> {
        v[list]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| {
                        (
                            x["order_id"].as_str().unwrap_or_default().to_owned(),
                            x.clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let reservations = by(&catalog, "reservations");
    let charges = by(&payments, "charges");
    let mut order_status: HashMap<String, String> = HashMap::new();
    for o in orders.as_array().map(Vec::as_slice).unwrap_or_default() {
        let id = o["id"].as_str().unwrap_or_default();
        let status = o["status"].as_str().unwrap_or_default();
        order_status.insert(id.to_owned(), status.to_owned());
        let res = reservations.get(id).and_then(|x| x["status"].as_str());
        let charge = charges.get(id);
        let charged = charge.and_then(|x| x["status"].as_str());
        match status {
            "confirmed" => {
                r.confirmed += 1;
                if res != Some("reserved") {
                    r.mismatches.push(format!(
                        "order {id} is confirmed but its stock is {}",
                        res.unwrap_or("not reserved")
                    ));
                }
                if charged != Some("charged") {
                    r.mismatches.push(format!(
                        "order {id} is confirmed but its payment is {}",
                        charged.unwrap_or("not taken")
                    ));
                } else if charge.and_then(|c| c["amount_cents"].as_i64())
                    != o["total_cents"].as_i64()
                {
                    r.mismatches.push(format!(
                        "order {id} was charged another amount than its total"
                    ));
                }
            }
            "cancelled" => {
                r.cancelled += 1;
                if res == Some("reserved") {
                    r.mismatches.push(format!(
                        "order {id} is cancelled but its stock is still reserved"
                    ));
                }
                if charged == Some("charged") {
                    r.mismatches.push(format!(
                        "order {id} is cancelled but its payment was not refunded"
                    ));
                }
            }
            _ => r.pending += 1,
        }
    }
    for (id, x) in &reservations {
        if x["status"] == "reserved" && !order_status.contains_key(id) {
            r.mismatches.push(format!(
                "stock is reserved for order {id}, which does not exist"
            ));
        }
    }
    for (id, x) in &charges {
        if x["status"] == "charged" && !order_status.contains_key(id) {
            r.mismatches.push(format!(
                "payment was taken for order {id}, which does not exist"
            ));
        }
    }
    // Stock: what is available plus what reservations hold is what was stocked.
    let mut held: HashMap<String, i64> = HashMap::new();
    for x in reservations.values().filter(|x| x["status"] == "reserved") {
        for i in x["items"].as_array().map(Vec::as_slice).unwrap_or_default() {
            *held
                .entry(i["product_id"].as_str().unwrap_or_default().to_owned())
                .or_default() += i["quantity"].as_i64().unwrap_or(0);
        }
    }
    for p in catalog["products"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        r.products += 1;
        let id = p["id"].as_str().unwrap_or_default();
        let (stock, total) = (
            p["stock"].as_i64().unwrap_or(0),
            p["total_stock"].as_i64().unwrap_or(0),
        );
        let h = held.get(id).copied().unwrap_or(0);
        if stock + h != total || stock < 0 {
            r.mismatches.push(format!(
                "product {id}: {stock} available + {h} reserved != {total} stocked"
            ));
        }
    }
    // Balances: credits minus what is charged is what is left.
    let mut spent: HashMap<String, i64> = HashMap::new();
    for x in charges.values().filter(|x| x["status"] == "charged") {
        *spent
            .entry(x["user_id"].as_str().unwrap_or_default().to_owned())
            .or_default() += x["amount_cents"].as_i64().unwrap_or(0);
    }
    for a in payments["accounts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        r.accounts += 1;
        let user = a["user_id"].as_str().unwrap_or_default();
        let (balance, credited) = (
            a["balance_cents"].as_i64().unwrap_or(0),
            a["credited_cents"].as_i64().unwrap_or(0),
        );
        let s = spent.get(user).copied().unwrap_or(0);
        if credited - s != balance || balance < 0 {
            r.mismatches.push(format!(
                "account {user}: {credited} credited - {s} charged != {balance} balance"
            ));
        }
    }
    Ok(r)
}
