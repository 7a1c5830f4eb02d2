fn main() { println!("{}", splice_proxy::PROBE.len()); }
