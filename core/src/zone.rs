//! Zone policy: stay in the local zone while it has headroom, spill only the excess.
//!
//! With `L_z`, `C_z` the load and capacity of zone z's healthy endpoints, `ū = ΣL / ΣC` the
//! cluster-wide load per unit capacity, θ = `zone.spill_threshold`, and `κ = min(1, 2k)` where k
//! is the known share of the load (measured or remembered rates, not priors of streams of
//! unknown rate):
//!
//! - **local**: `L_local ≤ (1 + κθ) · ū · C_local + κ·e` — the stream stays in the local zone
//!   (`ū` counts the new stream's expected rate `e`; the `+ κ·e` slack keeps a zone with only a
//!   few streams from spilling, and gives local streams priority over other zones' spill);
//! - **spill**: otherwise — a remote zone is drawn with probability proportional to its headroom
//!   below the mean, `max(0, ū · C_z − L_z)` (the least loaded one if none has any), so only the
//!   local excess crosses zones and it lands where there is room. Guests fill a zone only up to
//!   the mean: its tolerance `κθ` stays for its own clients' streams, so one zone's spill does not
//!   push another over its line and make that zone spill back (a → b, then b → a);
//! - **no-local**: the proxy has no zone, or no healthy endpoint in it: all zones are candidates;
//! - **fallback**: no usable endpoint data at all; Envoy's own policy decides.
//!
//! A stream **crosses zones** when this proxy's zone and its endpoint's are both known and
//! differ ([`crosses`]).
//!
//! In steady state (`κ = 1`) the local zone runs at most `(1 + θ)` times the mean, which is the
//! minimum cross-zone share `Σ_z max(0, d_z − (1 + θ) · c_z)` of ANCHORS.md. Rates nobody knows
//! yet (a reconnect storm, `k = 0`) carry no evidence to spend a tolerance on: they are spread in
//! proportion to capacity, the new stream (with what the other workers place meanwhile) crossing
//! the line at a random point of its size, so the local share is not rounded up. The tolerance is
//! back in full once half of the load is known: young streams joining a measured fleet do not
//! cost it its zone preference.

use super::endpoints::Zone;
use super::rng::Rng;

/// Whether an endpoint in `zone` is in another zone than `local`; `None` when either is unknown.
pub fn crosses(local: &str, zone: &str) -> Option<bool> {
    (!local.is_empty() && !zone.is_empty()).then(|| local != zone)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Local,
    Spill,
    NoLocal,
    Fallback,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::Local,
        Reason::Spill,
        Reason::NoLocal,
        Reason::Fallback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Local => "local",
            Reason::Spill => "spill",
            Reason::NoLocal => "no-local",
            Reason::Fallback => "fallback",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Where to look for an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneChoice {
    /// One zone (index into the cluster's zones).
    Zone(usize, Reason),
    /// Every healthy endpoint of every zone.
    Any(Reason),
}

/// `known`: the share k of the load that is known (see
/// [`crate::endpoints::Cluster::known_share`]); θ and the slack are scaled by `κ = min(1, 2k)`.
/// `expected`: the new stream's expected rate, counted in the mean it is compared with.
/// `peer_burst`: what the other workers are assumed to add with this placement (see
/// [`crate::router::Router::set_peers`]), also counted in the mean. `lead`: seconds since the
/// zones' sums were made; each zone's load counts its `growth` over them.
#[allow(clippy::too_many_arguments)]
pub fn choose(
    zones: &[Zone],
    local: &str,
    threshold: f64,
    known: f64,
    expected: f64,
    peer_burst: f64,
    lead: f64,
    rng: &mut Rng,
) -> ZoneChoice {
    if zones.is_empty() {
        return ZoneChoice::Any(Reason::Fallback);
    }
    let Some(li) = (!local.is_empty())
        .then(|| zones.iter().position(|z| z.name == local))
        .flatten()
    else {
        return ZoneChoice::Any(Reason::NoLocal);
    };
    let load_of = |z: &Zone| load_at(z, lead);
    let (load, capacity) = zones
        .iter()
        .fold((0.0, 0.0), |(l, c), z| (l + load_of(z), c + z.capacity));
    let (expected, peer_burst) = (expected.max(0.0), peer_burst.max(0.0));
    // κ: full tolerance once half of the load is known.
    let trust = (2.0 * known).clamp(0.0, 1.0);
    let mean = if capacity > 0.0 {
        (load + expected + peer_burst) / capacity
    } else {
        0.0
    };
    let limit = (1.0 + threshold * trust) * mean;
    let Some(lz) = zones.get(li) else {
        return ZoneChoice::Any(Reason::NoLocal);
    };
    // Known load gets one stream of slack above the limit: a handful of streams never spills,
    // and the local zone's own streams win over spill from other zones (whose target is the
    // mean). Unknown priors get none: the stream, and the burst of the other workers it stands
    // for, crosses the limit at a random point, which rounds the local share without bias.
    if zones.len() == 1 {
        return ZoneChoice::Zone(li, Reason::Local);
    }
    let unknown = peer_burst + (1.0 - trust) * expected;
    let crossing = if unknown > 0.0 {
        unknown * rng.next_f64()
    } else {
        0.0
    };
    if load_of(lz) + crossing <= limit * lz.capacity + trust * expected {
        return ZoneChoice::Zone(li, Reason::Local);
    }
    if let Some(i) = draw_by_headroom(zones, li, mean, lead, rng) {
        return ZoneChoice::Zone(i, Reason::Spill);
    }
    let per_capacity = |z: &Zone| {
        if z.capacity > 0.0 {
            load_of(z) / z.capacity
        } else {
            f64::INFINITY
        }
    };
    let least = zones
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != li)
        .min_by(|a, b| per_capacity(a.1).total_cmp(&per_capacity(b.1)))
        .map(|(i, _)| i)
        .unwrap_or(li);
    ZoneChoice::Zone(least, Reason::Spill)
}

/// A zone's load `lead` seconds after its sums were made: its growth counted over them.
fn load_at(z: &Zone, lead: f64) -> f64 {
    z.load + z.growth * lead.max(0.0)
}

/// A zone other than `local` drawn with probability proportional to its headroom
/// `max(0, line · C_z − L_z)`; `None` when no other zone has any.
fn draw_by_headroom(
    zones: &[Zone],
    local: usize,
    line: f64,
    lead: f64,
    rng: &mut Rng,
) -> Option<usize> {
    let headroom = |z: &Zone| (line * z.capacity - load_at(z, lead)).max(0.0);
    let others = || zones.iter().enumerate().filter(|(i, _)| *i != local);
    let total: f64 = others().map(|(_, z)| headroom(z)).sum();
    if total <= 0.0 {
        return None;
    }
    let mut x = rng.next_f64() * total;
    let mut last = None;
    for (i, z) in others() {
        let h = headroom(z);
        if h <= 0.0 {
            continue;
        }
        last = Some(i);
        if x < h {
            return Some(i);
        }
        x -= h;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn zone(name: &str, load: f64, capacity: f64) -> Zone {
        Zone {
            name: name.into(),
            healthy: vec![0],
            load,
            capacity,
            growth: 0.0,
        }
    }

    #[test]
    fn a_zone_counts_its_growth_since_the_sums_were_made() {
        let mut rng = Rng::new(3);
        let mut zs = [
            zone("a", 100.0, 1.0),
            zone("b", 100.0, 1.0),
            zone("c", 100.0, 1.0),
        ];
        zs[0].growth = 100.0;
        // Even at the sums: local. A second later `a` is expected at 200 of a mean 134: spill.
        assert_eq!(
            choose(&zs, "a", 0.1, 1.0, 1.0, 0.0, 0.0, &mut rng),
            ZoneChoice::Zone(0, Reason::Local)
        );
        assert!(matches!(
            choose(&zs, "a", 0.1, 1.0, 1.0, 0.0, 1.0, &mut rng),
            ZoneChoice::Zone(_, Reason::Spill)
        ));
        // A growing remote zone takes no spill past its line: b is expected at 300.
        zs[0].growth = 0.0;
        zs[0].load = 250.0;
        zs[1].growth = 200.0;
        for _ in 0..20 {
            assert_eq!(
                choose(&zs, "a", 0.1, 1.0, 1.0, 0.0, 1.0, &mut rng),
                ZoneChoice::Zone(2, Reason::Spill)
            );
        }
    }

    #[test]
    fn stays_local_within_threshold() {
        let mut rng = Rng::new(1);
        let zs = [
            zone("a", 10.0, 1.0),
            zone("b", 9.0, 1.0),
            zone("c", 8.0, 1.0),
        ];
        assert_eq!(
            choose(&zs, "a", 0.2, 1.0, 0.0, 0.0, 0.0, &mut rng),
            ZoneChoice::Zone(0, Reason::Local)
        );
        assert_eq!(
            choose(&zs, "c", 0.0, 1.0, 0.0, 0.0, 0.0, &mut rng),
            ZoneChoice::Zone(2, Reason::Local)
        );
        assert_eq!(
            choose(&[], "a", 0.1, 1.0, 0.0, 0.0, 0.0, &mut rng),
            ZoneChoice::Any(Reason::Fallback)
        );
        assert_eq!(
            choose(&zs, "", 0.1, 1.0, 0.0, 0.0, 0.0, &mut rng),
            ZoneChoice::Any(Reason::NoLocal)
        );
        assert_eq!(
            choose(&zs, "d", 0.1, 1.0, 0.0, 0.0, 0.0, &mut rng),
            ZoneChoice::Any(Reason::NoLocal)
        );
    }

    #[test]
    fn spills_in_proportion_to_headroom() {
        let mut rng = Rng::new(2);
        // mean = 60/3 = 20, limit 22: headroom b = 22-10 = 12, c = 22-18 = 4.
        let zs = [
            zone("a", 32.0, 1.0),
            zone("b", 10.0, 1.0),
            zone("c", 18.0, 1.0),
        ];
        let mut counts = [0; 3];
        for _ in 0..8000 {
            match choose(&zs, "a", 0.1, 1.0, 0.0, 0.0, 0.0, &mut rng) {
                ZoneChoice::Zone(i, Reason::Spill) => counts[i] += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(counts[0], 0);
        // Mean 20: headroom below it b 10, c 2.
        let share_b = counts[1] as f64 / 8000.0;
        assert!((share_b - 10.0 / 12.0).abs() < 0.03, "{counts:?}");
    }

    #[test]
    fn spill_leaves_other_zones_their_tolerance() {
        let mut rng = Rng::new(11);
        // Mean 20, limit 22: b (21) is within its own tolerance but above the mean, so a's
        // spill goes to c only; b's room up to 22 stays for b's own clients.
        let zs = [
            zone("a", 30.0, 1.0),
            zone("b", 21.0, 1.0),
            zone("c", 9.0, 1.0),
        ];
        for _ in 0..2000 {
            let got = choose(&zs, "a", 0.1, 1.0, 0.0, 0.0, 0.0, &mut rng);
            assert_eq!(got, ZoneChoice::Zone(2, Reason::Spill));
        }
    }

    #[test]
    fn spill_without_headroom_goes_to_least_loaded() {
        let mut rng = Rng::new(3);
        // threshold 0: limit = mean = 10; nobody remote below it except c at 9.99 per unit.
        let zs = [
            zone("a", 20.0, 1.0),
            zone("b", 30.0, 3.0),
            zone("c", 29.97, 3.0),
        ];
        let got = choose(&zs, "a", 0.0, 1.0, 0.0, 0.0, 0.0, &mut rng);
        assert!(
            matches!(got, ZoneChoice::Zone(1 | 2, Reason::Spill)),
            "{got:?}"
        );
        let zs = [zone("a", 20.0, 1.0), zone("b", 40.0, 1.0)];
        assert_eq!(
            choose(&zs, "a", 0.0, 1.0, 0.0, 0.0, 0.0, &mut rng),
            ZoneChoice::Zone(0, Reason::Local)
        );
    }

    /// Places `n` streams of rate 1 one by one (each worker's own placement counting
    /// `1 + peers`), as the router does, and returns the local zone's share.
    fn local_share(n: usize, known: f64, peers: f64, rng: &mut Rng) -> f64 {
        let mut zs = [
            zone("a", 0.0, 1.0),
            zone("b", 0.0, 1.0),
            zone("c", 0.0, 1.0),
        ];
        let mut local = 0.0;
        for _ in 0..n {
            let unit = 1.0 + peers;
            match choose(&zs, "a", 0.1, known, 1.0, peers, 0.0, rng) {
                ZoneChoice::Zone(i, _) => {
                    zs[i].load += unit;
                    if i == 0 {
                        local += unit;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        local / zs.iter().map(|z| z.load).sum::<f64>()
    }

    #[test]
    fn unknown_rates_spread_by_capacity_known_ones_keep_the_tolerance() {
        let mut rng = Rng::new(4);
        let mean = |known: f64, peers: f64, rng: &mut Rng| {
            (0..400)
                .map(|_| local_share(30, known, peers, rng))
                .sum::<f64>()
                / 400.0
        };
        // Known rates: θ and one stream of slack, as before.
        let known = mean(1.0, 0.0, &mut rng);
        assert!(known > 0.38, "{known}");
        // Unknown rates: a third, for one worker and for 8 or 16 workers each placing a few.
        for (n, peers) in [(30, 0.0), (8, 7.0), (4, 15.0)] {
            let share = (0..2000)
                .map(|_| local_share(n, 0.0, peers, &mut rng))
                .sum::<f64>()
                / 2000.0;
            assert!(
                (share - 1.0 / 3.0).abs() < 0.03,
                "{n} streams, {peers} peers: {share}"
            );
        }
    }
}
