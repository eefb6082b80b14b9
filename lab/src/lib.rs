//! streamlb lab: gRPC test pods and a device simulator for exercising the streamlb filter.

pub mod hist;
pub mod ledger;
pub mod proto;
pub mod rates;
pub mod rng;
