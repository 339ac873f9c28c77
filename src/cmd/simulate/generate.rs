//! The synthetic pump's traffic, as a pure, seeded generator: the same seed gives the same
//! reports, so a test can compute what `simulate` sent without listening to it.

use crate::core::emit::{Outgoing, emit};
use crate::core::report::{Format, H_CLIENT, H_SOURCE, Identity, Report};
use crate::core::stamp::Stamp;
use crate::core::{CodeClass, Headers};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Which wire formats to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatChoice {
    /// 2015 v01 log lines.
    V01,
    /// v02 reports (7-field body).
    V02,
    /// v03 JSON written by v2 (`resultCode`, host, user).
    V03,
    /// v03 JSON as sr3 writes it (`code`, no host or user).
    Sr3,
    /// sr3 writing v02: announcement body plus a nested `report` header table.
    Sr3v02,
    /// sr2 in v03 mode: JSON content type, v02 body, v03 fields as headers.
    Sr2v03,
    /// All of the above, chosen at random.
    Mix,
}

const ALL: [FormatChoice; 6] = [
    FormatChoice::V01,
    FormatChoice::V02,
    FormatChoice::V03,
    FormatChoice::Sr3,
    FormatChoice::Sr3v02,
    FormatChoice::Sr2v03,
];

const SOURCES: [&str; 8] = [
    "radar", "sat", "ec_cmc", "nws", "hydro", "ocean", "ice", "metoc",
];
const CLIENTS: [&str; 8] = [
    "cfs", "edu", "nrcan", "dfo", "wxo", "marine", "aviation", "agri",
];
const GOOD: [u16; 6] = [201, 201, 201, 201, 205, 304];
const BAD: [u16; 6] = [404, 499, 499, 500, 503, 410];
const DIRS: [(&str, &str); 4] = [
    ("GIF", "gif"),
    ("grib2", "grib2"),
    ("h5", "h5"),
    ("bufr", "bufr"),
];

/// `n` names from `base`, numbered once the list runs out (`radar`, …, `radar2`, …).
pub fn names(base: &[&str], n: u32) -> Vec<String> {
    (0..n as usize)
        .map(|i| {
            let b = base[i % base.len()];
            match i / base.len() {
                0 => b.to_owned(),
                k => format!("{b}{}", k + 1),
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub sources: Vec<String>,
    pub clients: Vec<String>,
    pub hosts: Vec<String>,
    pub error_ratio: f64,
    pub format: FormatChoice,
    pub starts: bool,
    pub seed: u64,
    /// Publish everything here instead of each client's `xs_<client>`.
    pub exchange: Option<String>,
    /// Stamp `pumpwatch_client`/`pumpwatch_source` as `route` would (for traffic that
    /// bypasses `route`, e.g. straight into `xreport`).
    pub stamp: bool,
    /// The host `--fail-node` makes fail: its reports are always in a format that names
    /// the host (sr3's formats name none, so a watchdog could not tell whose they are).
    pub fail_node: Option<String>,
    /// The pump the products come from and go to (`from_cluster`, `to_clusters`).
    pub cluster: String,
    /// Clients whose transfers fail at their own rate instead of `error_ratio`.
    pub client_error_ratio: std::collections::BTreeMap<String, f64>,
}

impl Plan {
    pub fn new(sources: u32, clients: u32, hosts: u32) -> Plan {
        Plan {
            sources: names(&SOURCES, sources.max(1)),
            clients: names(&CLIENTS, clients.max(1)),
            hosts: (1..=hosts.max(1)).map(|i| format!("node{i}")).collect(),
            error_ratio: 0.1,
            format: FormatChoice::Mix,
            starts: false,
            seed: 1,
            exchange: None,
            stamp: false,
            fail_node: None,
            cluster: "sim.pump".to_owned(),
            client_error_ratio: Default::default(),
        }
    }
}

/// One message to publish, with the facts a test or the summary needs.
#[derive(Debug, Clone)]
pub struct Sim {
    pub exchange: String,
    pub out: Outgoing,
    pub code: u16,
    pub source: String,
    pub client: String,
    pub host: String,
    pub rel_path: String,
    pub flow: String,
    pub format: Format,
}

impl Sim {
    /// The message as a consumer of `exchange` receives it (no `user_id`), for parsing.
    pub fn incoming(&self) -> crate::core::report::Incoming<'_> {
        crate::core::report::Incoming {
            exchange: &self.exchange,
            routing_key: &self.out.routing_key,
            body: &self.out.body,
            content_type: Some(self.out.content_type),
            user_id: None,
            headers: &self.out.headers,
        }
    }
}

pub struct Generator {
    plan: Plan,
    rng: SmallRng,
    seq: u64,
}

impl Generator {
    pub fn new(plan: Plan) -> Generator {
        let rng = SmallRng::seed_from_u64(plan.seed);
        Generator { plan, rng, seq: 0 }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The messages for the next product: its 102 first when `starts`, then the outcome.
    pub fn next_product(&mut self, now: Stamp) -> Vec<Sim> {
        self.seq += 1;
        let p = &self.plan;
        let source = p.sources[self.rng.random_range(0..p.sources.len())].clone();
        let client = p.clients[self.rng.random_range(0..p.clients.len())].clone();
        let host = p.hosts[self.rng.random_range(0..p.hosts.len())].clone();
        let (dir, ext) = DIRS[self.rng.random_range(0..DIRS.len())];
        let flow = format!("{source}-f{}", self.rng.random_range(1..=3));
        let day = now.v02()[..8].to_owned();
        let rel_path = format!("{day}/{source}/{dir}/{source}_{:06}.{ext}", self.seq);
        let ratio = p
            .client_error_ratio
            .get(&client)
            .copied()
            .unwrap_or(p.error_ratio);
        let failed = self.rng.random_bool(ratio.clamp(0.0, 1.0));
        let code = if failed {
            BAD[self.rng.random_range(0..BAD.len())]
        } else {
            GOOD[self.rng.random_range(0..GOOD.len())]
        };
        let mut choice = match p.format {
            FormatChoice::Mix => ALL[self.rng.random_range(0..ALL.len())],
            f => f,
        };
        if p.fail_node.as_ref() == Some(&host) {
            choice = match choice {
                FormatChoice::Sr3 => FormatChoice::V03,
                FormatChoice::Sr3v02 => FormatChoice::V02,
                c => c,
            };
        }
        let size: u64 = self.rng.random_range(1_000..10_000_000);
        let duration = (self.rng.random_range(0.01..5.0f64) * 1000.0).round() / 1000.0;
        let sum: u64 = self.rng.random();
        let exchange = p
            .exchange
            .clone()
            .unwrap_or_else(|| crate::broker::names::user_exchange(&client));
        let sr3 = matches!(choice, FormatChoice::Sr3 | FormatChoice::Sr3v02);
        let mut report = Report {
            format: Format::V02,
            topic: String::new(),
            exchange: exchange.clone(),
            pub_time: Some(now),
            base_url: format!("sftp://{source}@data.{source}.example"),
            rel_path: rel_path.clone(),
            code,
            message: Some(message(code).to_owned()),
            host: (!sr3).then(|| host.clone()),
            user: (!sr3).then(|| client.clone()),
            duration_s: Some(duration),
            source: Some(source.clone()),
            from_cluster: Some(p.cluster.clone()),
            to_clusters: vec![p.cluster.clone()],
            flow: Some(flow.clone()),
            size_bytes: Some(size),
            identity: Some(Identity {
                method: "md5".into(),
                value: format!("{sum:016x}{:016x}", self.seq),
            }),
            time_completed: sr3.then_some(now),
            stamped_client: None,
            stamped_source: None,
            extra: Headers::new(),
        };
        let format = match choice {
            FormatChoice::V01 => Format::V01,
            FormatChoice::V02 => Format::V02,
            FormatChoice::V03 | FormatChoice::Sr3 => Format::V03,
            FormatChoice::Sr3v02 => Format::V02Sr3,
            FormatChoice::Sr2v03 => Format::V03Sr2,
            FormatChoice::Mix => unreachable!("mix is resolved above"),
        };
        if p.stamp {
            report.extra.set(H_CLIENT, client.as_str());
            report.extra.set(H_SOURCE, source.as_str());
        }
        let sim = |report: &Report| Sim {
            exchange: exchange.clone(),
            out: emit(report, format),
            code: report.code,
            source: source.clone(),
            client: client.clone(),
            host: host.clone(),
            rel_path: rel_path.clone(),
            flow: flow.clone(),
            format,
        };
        let mut out = Vec::with_capacity(2);
        if p.starts {
            let mut started = report.clone();
            started.code = crate::core::code::STARTED;
            started.message = Some("Transfer started".into());
            started.duration_s = Some(0.0);
            out.push(sim(&started));
        }
        out.push(sim(&report));
        out
    }
}

/// How `--fail-node` bends the traffic of one host: its finals are held back, so a few of
/// its transfers are always open (started, not finished); once it fails, the held finals
/// are never sent and the host sends nothing more, as a node that died would.
#[derive(Debug, Clone)]
pub struct FailingNode {
    pub host: String,
    held: std::collections::VecDeque<Sim>,
    failed: bool,
    /// The finals never sent: the transfers left open by the failure, oldest first.
    pub lost: Vec<Sim>,
}

impl FailingNode {
    /// Transfers the node keeps open while it runs.
    pub const HOLD: usize = 5;

    pub fn new(host: &str) -> FailingNode {
        FailingNode {
            host: host.to_owned(),
            held: Default::default(),
            failed: false,
            lost: Vec::new(),
        }
    }

    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// What to publish of one product's messages (its 102, then its outcome).
    pub fn pass(&mut self, sims: Vec<Sim>) -> Vec<Sim> {
        if sims.first().is_none_or(|s| s.host != self.host) {
            return sims;
        }
        if self.failed {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(2);
        for s in sims {
            if s.code == crate::core::code::STARTED {
                out.push(s);
                continue;
            }
            self.held.push_back(s);
            if self.held.len() > Self::HOLD
                && let Some(oldest) = self.held.pop_front()
            {
                out.push(oldest);
            }
        }
        out
    }

    /// From now on the node is silent; what it held is lost.
    pub fn fail(&mut self) {
        self.failed = true;
        self.lost = self.held.drain(..).collect();
    }
}

fn message(code: u16) -> &'static str {
    match code {
        201 => "Downloaded",
        205 => "Reset content",
        304 => "Not modified",
        404 => "Not found",
        410 => "Gone",
        499 => "Failed",
        500 => "Internal error",
        503 => "Service unavailable",
        _ => match CodeClass::of(code) {
            CodeClass::Done => "Done",
            _ => "Unknown",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::names::exchange_owner;
    use crate::core::report::{Message, parse};

    fn now() -> Stamp {
        Stamp::parse("20261127T120000").unwrap()
    }

    #[test]
    fn same_seed_same_traffic() {
        let mut a = Generator::new(Plan::new(3, 4, 2));
        let mut b = Generator::new(Plan::new(3, 4, 2));
        for _ in 0..50 {
            assert_eq!(a.next_product(now())[0].out, b.next_product(now())[0].out);
        }
    }

    #[test]
    fn every_generated_report_parses_to_what_was_meant() {
        let mut plan = Plan::new(3, 4, 2);
        plan.starts = true;
        plan.error_ratio = 0.3;
        let mut g = Generator::new(plan);
        for _ in 0..500 {
            for s in g.next_product(now()) {
                let inc = s.incoming();
                let Ok(Message::Report(r)) = parse(&inc) else {
                    panic!("{s:?}")
                };
                assert_eq!(r.code, s.code);
                assert_eq!(r.source.as_deref(), Some(s.source.as_str()));
                assert_eq!(
                    r.user.as_deref().or(exchange_owner(&s.exchange)),
                    Some(s.client.as_str())
                );
                assert_eq!(r.rel_path, s.rel_path);
                assert_eq!(r.format, s.format);
            }
        }
    }

    #[test]
    fn a_failing_node_holds_its_finals_then_goes_silent() {
        let mut plan = Plan::new(1, 2, 3);
        plan.starts = true;
        plan.fail_node = Some("node2".into());
        let mut g = Generator::new(plan);
        let mut f = FailingNode::new("node2");
        let mut sent = Vec::new();
        for _ in 0..60 {
            sent.extend(f.pass(g.next_product(now())));
        }
        f.fail();
        let after: Vec<Sim> = (0..60)
            .flat_map(|_| f.pass(g.next_product(now())))
            .collect();
        assert!(after.iter().all(|s| s.host != "node2"));
        assert!(after.iter().any(|s| s.host == "node1"));
        assert_eq!(f.lost.len(), FailingNode::HOLD);
        let node2: Vec<&Sim> = sent.iter().filter(|s| s.host == "node2").collect();
        let starts = node2.iter().filter(|s| s.code == 102).count();
        let finals = node2.len() - starts;
        assert_eq!(starts, finals + FailingNode::HOLD);
        for lost in &f.lost {
            assert!(
                sent.iter()
                    .any(|s| s.code == 102 && s.rel_path == lost.rel_path)
            );
            assert!(
                !sent
                    .iter()
                    .any(|s| s.code != 102 && s.rel_path == lost.rel_path)
            );
            // In a format that names the host.
            let inc = lost.incoming();
            let Ok(Message::Report(r)) = parse(&inc) else {
                panic!("{lost:?}")
            };
            assert_eq!(r.host.as_deref(), Some("node2"));
        }
    }

    #[test]
    fn a_client_can_fail_at_its_own_rate() {
        let mut plan = Plan::new(2, 3, 2);
        plan.error_ratio = 0.0;
        plan.client_error_ratio.insert("edu".into(), 1.0);
        let mut g = Generator::new(plan);
        let mut seen = (0, 0);
        for _ in 0..300 {
            for s in g.next_product(now()) {
                let bad = CodeClass::of(s.code).is_error();
                if s.client == "edu" {
                    assert!(bad, "{}", s.code);
                    seen.0 += 1;
                } else {
                    assert!(!bad, "{}", s.code);
                    seen.1 += 1;
                }
            }
        }
        assert!(seen.0 > 50 && seen.1 > 100, "{seen:?}");
    }

    #[test]
    fn names_extend_past_the_list() {
        assert_eq!(
            names(&SOURCES, 10)[8..],
            ["radar2".to_owned(), "sat2".to_owned()]
        );
    }
}
