//! The example services, each a few dozen lines on the participant SDK
//! ([`txcoord_participant`]): [`inventory`] (stock per SKU), [`payment`] (balances),
//! [`order`] (orders) and [`bank`] (two-step transfers, for the fault suite). Their record
//! types are public so the order demo and the fault suite read the services' own records.
//!
//! [`common`] is what the services share (arguments, seeding, running until a signal),
//! [`config`] reads the part of txcoord's configuration a service needs, and [`quantity`]
//! is the hold/settle logic of a quantity in a record (stock, a balance); [`sweep`] forgets
//! the saga markers of finished sagas.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bank;
pub mod common;
pub mod config;
pub mod inventory;
pub mod order;
pub mod payment;
pub mod quantity;
pub mod sweep;
