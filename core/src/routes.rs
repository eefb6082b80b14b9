//! Route names, interned and capped: at most `max_routes` distinct names are tracked, later
//! ones fold into [`OTHER`], so metric label cardinality is bounded by construction.

use hashbrown::HashMap;

use super::RouteIdx;

/// Index and name of the fold-over route.
pub const OTHER: RouteIdx = RouteIdx(0);
pub const OTHER_NAME: &str = "other";

#[derive(Debug, Clone)]
pub struct RouteNames {
    names: Vec<String>,
    index: HashMap<String, RouteIdx>,
    cap: usize,
}

impl RouteNames {
    pub fn new(cap: usize) -> Self {
        RouteNames {
            names: vec![OTHER_NAME.to_string()],
            index: HashMap::new(),
            cap,
        }
    }

    /// Index of `name`, registering it while fewer than `cap` routes are tracked.
    pub fn intern(&mut self, name: &str) -> RouteIdx {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        if self.names.len() > self.cap || name == OTHER_NAME {
            return OTHER;
        }
        let i = RouteIdx(self.names.len());
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), i);
        i
    }

    pub fn name(&self, i: RouteIdx) -> &str {
        self.names.get(i.0).map_or(OTHER_NAME, String::as_str)
    }

    /// Number of indices in use (including `other`).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn ten_thousand_names_fold_beyond_the_cap() {
        let mut r = RouteNames::new(64);
        let mut distinct = hashbrown::HashSet::new();
        for i in 0..10_000 {
            distinct.insert(r.intern(&format!("route-{i}")));
        }
        assert_eq!(distinct.len(), 65); // cap + other
        assert_eq!(r.len(), 65);
        assert_eq!(r.intern("route-3"), RouteIdx(4));
        let folded = r.intern("route-9999");
        assert_eq!(r.name(folded), "other");
        assert_eq!(r.intern("other"), OTHER);
    }
}
