// Prints interface events of the current network namespace, one per line, until killed.
//
//   nbs-netlink-probe [--json] [--debug] [--rcvbuf BYTES]
//
// The first line is "ready" ({"event":"ready"} with --json), printed once the monitor has
// subscribed and dumped; then the current state as events, then changes as they happen. The
// integration tests run it under `ip netns exec`.
import NBSNetlink
#if canImport(Glibc)
import Glibc
#endif

@main
struct Probe {
    struct Options {
        var json = false
        var debug = false
        var receiveBufferSize = 1 << 20
    }

    static func main() async {
        let options = parseOptions()
        let monitor: NetlinkInterfaceMonitor
        do {
            monitor = try NetlinkInterfaceMonitor(
                receiveBufferSize: options.receiveBufferSize,
                debugLog: options.debug ? { @Sendable line in emit("debug: \(line)", fd: 2) } : nil)
            try monitor.start()
        } catch {
            emit("nbs-netlink-probe: \(error)", fd: 2)
            exit(1)
        }
        emit(options.json ? #"{"event":"ready"}"# : "ready")
        for await event in monitor.events {
            emit(render(event, json: options.json))
        }
    }

    static func parseOptions() -> Options {
        var options = Options()
        var arguments = CommandLine.arguments.dropFirst()
        while let argument = arguments.popFirst() {
            switch argument {
            case "--json": options.json = true
            case "--debug": options.debug = true
            case "--rcvbuf":
                guard let value = arguments.popFirst().flatMap({ Int($0) }) else {
                    emit("--rcvbuf needs a byte count", fd: 2)
                    exit(2)
                }
                options.receiveBufferSize = value
            case "-h", "--help":
                emit("usage: nbs-netlink-probe [--json] [--debug] [--rcvbuf BYTES]")
                exit(0)
            default:
                emit("unknown argument \(argument)", fd: 2)
                exit(2)
            }
        }
        return options
    }
}

/// One write(2) per line: whoever reads our stdout waits for each line, and stdio would hold it
/// back while stdout is a pipe.
func emit(_ line: String, fd: Int32 = 1) {
    let bytes = Array((line + "\n").utf8)
    var offset = 0
    while offset < bytes.count {
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
        if written < 0 {
            if errno == EINTR { continue }
            exit(1)
        }
        offset += written
    }
}

func quoted(_ text: String) -> String {
    var out = "\""
    for scalar in text.unicodeScalars {
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        case let s where s.value < 0x20:
            let hex = String(s.value, radix: 16)
            out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out + "\""
}

func render(_ event: InterfaceEvent, json: Bool) -> String {
    func interface(_ name: String, _ i: NetworkInterface) -> String {
        guard json else { return "\(name) \(i.name) index=\(i.index) up=\(i.isUp)" }
        return #"{"event":\#(quoted(name)),"index":\#(i.index),"name":\#(quoted(i.name)),"isUp":\#(i.isUp),"isLoopback":\#(i.isLoopback),"flags":\#(i.flags),"operState":\#(i.operState)}"#
    }
    func address(_ name: String, _ a: InterfaceAddress) -> String {
        guard json else {
            return "\(name) \(a.interfaceName) \(a.address)/\(a.prefixLength) \(a.family) scope=\(a.scope) flags=0x\(String(a.flags, radix: 16))"
        }
        return #"{"event":\#(quoted(name)),"interfaceIndex":\#(a.interfaceIndex),"interfaceName":\#(quoted(a.interfaceName)),"family":"\#(a.family)","address":\#(quoted(a.address)),"prefixLength":\#(a.prefixLength),"scope":\#(a.scope),"flags":\#(a.flags)}"#
    }
    switch event {
    case .interfaceUp(let i): return interface("interfaceUp", i)
    case .interfaceDown(let i): return interface("interfaceDown", i)
    case .interfaceRemoved(let i): return interface("interfaceRemoved", i)
    case .addressAdded(let a): return address("addressAdded", a)
    case .addressRemoved(let a): return address("addressRemoved", a)
    }
}
