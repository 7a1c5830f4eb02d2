//! `send_proxy`: the PROXY protocol header a route writes to its backend before the
//! first message, through the real binary on IPv4 and IPv6 listeners. A raw backend
//! checks the bytes against the specification's layout (built here by hand, not by the
//! crate the proxy uses); nginx's stream module (`listen ... proxy_protocol`) and
//! HAProxy (`bind ... accept-proxy`), both from Debian, parse them as real consumers
//! and answer with the client address they read.

mod support;

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use support::*;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("splice-proxy-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A process killed and reaped when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx with a stream server on each of `ports` (v1 and v2 are the same to nginx)
/// that answers what the PROXY header said, then closes. `ssl_preread` is there to read
/// the client's first message (it finds no ClientHello and lets it be): a socket closed
/// with unread bytes sends a reset, which could overtake the answer.
fn nginx(ports: &[u16]) -> Daemon {
    let dir = temp_dir(&format!("nginx-{}", ports[0]));
    let servers: String = ports
        .iter()
        .map(|port| {
            format!(
                "    server {{\n        listen 127.0.0.1:{port} proxy_protocol;\n        \
                 ssl_preread on;\n        return \"$proxy_protocol_addr:$proxy_protocol_port \
                 $proxy_protocol_server_addr:$proxy_protocol_server_port\\n\";\n    }}\n"
            )
        })
        .collect();
    // Debian's nginx has the stream module as a separate package; without it nginx would
    // exit at once, its complaint sent to /dev/null, and the test fail on a port that
    // nothing listens on.
    let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
    if !Path::new(module).is_file() {
        not_installed(module, "libnginx-mod-stream");
    }
    let conf = format!(
        "load_module {module};\n\
         daemon off;\nmaster_process off;\nerror_log stderr;\npid {dir}/nginx.pid;\n\
         events {{}}\nstream {{\n{servers}}}\n",
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = external("nginx", "nginx")
        .args(["-e", "stderr", "-p"])
        .arg(&dir)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx starts");
    let daemon = Daemon(child);
    for &port in ports {
        wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    daemon
}

/// HAProxy with an HTTP frontend on each of `ports` that accepts a PROXY header (v1 or
/// v2, whichever comes) and answers every request with the addresses it carried.
fn haproxy(ports: &[u16]) -> Daemon {
    let dir = temp_dir(&format!("haproxy-{}", ports[0]));
    let frontends: String = ports
        .iter()
        .map(|port| {
            format!(
                "frontend fe{port}\n    bind 127.0.0.1:{port} accept-proxy\n    \
                 http-request return status 200 content-type text/plain \
                 lf-string \"%[src]:%[src_port] %[dst]:%[dst_port]\\n\"\n"
            )
        })
        .collect();
    let conf = format!(
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 20s\n    \
         timeout server 20s\n{frontends}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf).unwrap();
    let child = external("haproxy", "haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy starts");
    let daemon = Daemon(child);
    for &port in ports {
        wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    daemon
}

/// The header as proxy-protocol.txt lays it out, for a TCP connection from `client`
/// to `server`.
fn expected_header(version: &str, client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    if version == "v1" {
        let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
        return format!(
            "PROXY {family} {} {} {} {}\r\n",
            client.ip(),
            server.ip(),
            client.port(),
            server.port()
        )
        .into_bytes();
    }
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(0x21); // version 2, PROXY
    let octets = |ip: IpAddr| match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let (family, length) = if client.is_ipv4() {
        (0x11, 12u16) // AF_INET, STREAM
    } else {
        (0x21, 36u16) // AF_INET6, STREAM
    };
    header.push(family);
    header.extend(length.to_be_bytes());
    header.extend(octets(client.ip()));
    header.extend(octets(server.ip()));
    header.extend(client.port().to_be_bytes());
    header.extend(server.port().to_be_bytes());
    header
}

/// The routes: "v1 "/"v2 " to the sinks, "n1 "/"n2 " to nginx, HTTP paths /v1/ and
/// /v2/ to HAProxy, each route with the `send_proxy` its name says.
fn routes(sinks: [SocketAddr; 2], nginx: [u16; 2], haproxy: [u16; 2]) -> PathBuf {
    let mut text = String::new();
    for (i, version) in ["v1", "v2"].into_iter().enumerate() {
        let n = &version[1..];
        text += &format!(
            "[[route]]\nname = \"sink-{version}\"\nprefix = \"{version} \"\n\
             send_proxy = \"{version}\"\nbackends = [\"{}\"]\n\n\
             [[route]]\nname = \"nginx-{version}\"\nprefix = \"n{n} \"\n\
             send_proxy = \"{version}\"\nbackends = [\"127.0.0.1:{}\"]\n\n\
             [[route]]\nname = \"haproxy-{version}\"\nhttp_path_prefix = \"/{version}/\"\n\
             send_proxy = \"{version}\"\nbackends = [\"127.0.0.1:{}\"]\n\n",
            sinks[i], nginx[i], haproxy[i]
        );
    }
    // Named by a port: each test writes its own file.
    routes_file(&format!("proxy-protocol-{}", nginx[0]), &text)
}

struct Setup {
    sinks: [std::sync::mpsc::Receiver<(u64, [u8; 32])>; 2],
    _backends: Vec<Backend>,
    _daemons: [Daemon; 2],
    proxies: [ProxyProcess; 2],
}

fn setup() -> Setup {
    let (sink_v1, rx_v1) = Backend::sink();
    let (sink_v2, rx_v2) = Backend::sink();
    let nginx_ports = [free_port(), free_port()];
    let haproxy_ports = [free_port(), free_port()];
    let daemons = [nginx(&nginx_ports), haproxy(&haproxy_ports)];
    let routes = routes([sink_v1.addr, sink_v2.addr], nginx_ports, haproxy_ports);
    let routes = routes.to_str().unwrap();
    let proxies = ["127.0.0.1:0", "[::1]:0"]
        .map(|listen| ProxyProcess::start(&["--listen", listen, "--routes", routes]));
    Setup {
        sinks: [rx_v1, rx_v2],
        _backends: vec![sink_v1, sink_v2],
        _daemons: daemons,
        proxies,
    }
}

#[test]
fn headers_reach_the_backend_byte_for_byte_before_the_first_message() {
    let setup = setup();
    let data = shared_payload(4 << 20, 11);
    for proxy in &setup.proxies {
        for (i, version) in ["v1", "v2"].into_iter().enumerate() {
            let mut stream = connect(proxy.addr());
            let client = stream.local_addr().unwrap();
            let mut sent = format!("{version} ").into_bytes();
            sent.extend_from_slice(&data);
            stream.write_all(&sent).unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
            let mut expected = expected_header(version, client, proxy.addr());
            let header_len = expected.len();
            expected.extend_from_slice(&sent);
            let got = setup.sinks[i]
                .recv_timeout(IO_TIMEOUT)
                .unwrap_or_else(|e| panic!("the sink reports: {e}; proxy:\n{}", proxy.stderr()));
            assert_eq!(
                got,
                (expected.len() as u64, sha256(&expected)),
                "{version} from {client}: {header_len}-byte header, then {} bytes",
                sent.len()
            );
            // The access log counts what the client sent, not the header.
            let logged = proxy.wait_for_log(
                &format!("client={client} route=sink-{version}"),
                Duration::from_secs(10),
            );
            assert!(
                logged.contains(&format!("bytes_up={} ", sent.len())),
                "{logged}"
            );
        }
    }
}

#[test]
fn nginx_stream_reads_the_client_address_from_v1_and_v2() {
    let setup = setup();
    for proxy in &setup.proxies {
        for n in ["1", "2"] {
            let mut stream = connect(proxy.addr());
            let client = stream.local_addr().unwrap();
            stream
                .write_all(format!("n{n} hello\n").as_bytes())
                .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            assert_eq!(
                answer,
                format!(
                    "{}:{} {}:{}\n",
                    client.ip(),
                    client.port(),
                    proxy.addr().ip(),
                    proxy.addr().port()
                ),
                "v{n} from {client}"
            );
        }
    }
}

#[test]
fn haproxy_accept_proxy_reads_the_client_address_from_v1_and_v2() {
    let setup = setup();
    for proxy in &setup.proxies {
        let addr = proxy.addr();
        let host = match addr.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        for version in ["v1", "v2"] {
            let url = format!("http://{host}:{}/{version}/who", addr.port());
            let output = output_within(
                external("curl", "curl").args(["-sS", "-w", "%{local_ip} %{local_port}", &url]),
                Duration::from_secs(20),
            );
            assert!(
                output.status.success(),
                "curl {url}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let text = String::from_utf8(output.stdout).unwrap();
            let (answer, local) = text.split_once('\n').expect("an answer line");
            let (ip, port) = local.split_once(' ').unwrap();
            let client = SocketAddr::new(ip.parse().unwrap(), port.parse().unwrap());
            assert_eq!(
                answer,
                format!(
                    "{}:{} {}:{}",
                    client.ip(),
                    client.port(),
                    addr.ip(),
                    addr.port()
                ),
                "{version} from {client}"
            );
        }
    }
}
