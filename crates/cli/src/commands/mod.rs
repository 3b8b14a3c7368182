pub mod blob;
pub mod build;
pub mod check;
pub mod fscache;
pub mod inspect;
pub mod mount;
pub mod push;
pub mod status;
