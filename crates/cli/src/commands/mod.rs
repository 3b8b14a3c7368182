pub mod blob;
pub mod build;
pub mod check;
pub mod inspect;
