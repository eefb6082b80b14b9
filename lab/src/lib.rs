//! streamlb lab: gRPC test pods and a device simulator for exercising the streamlb filter.

pub mod devices;
pub mod hist;
pub mod ledger;
pub mod plan;
pub mod pods;
pub mod proto;
pub mod rates;
pub mod rng;
pub mod scenario;
pub mod sim;
