//! Helpers shared by the core's simulated-time tests.

use streamlb_core::discovery::{ClusterSnapshot, DiscoveredEndpoint};

/// A discovery snapshot of cluster `pods`: healthy endpoints of weight 1, (address, zone) each.
pub fn snapshot(pods: &[(String, String)]) -> Vec<ClusterSnapshot> {
    vec![ClusterSnapshot {
        name: "pods".into(),
        endpoints: pods
            .iter()
            .map(|(address, zone)| DiscoveredEndpoint {
                address: address.clone(),
                zone: zone.clone(),
                healthy: true,
                weight: 1,
            })
            .collect(),
    }]
}
