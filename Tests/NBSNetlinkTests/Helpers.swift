@testable import NBSNetlink

extension [UInt8] {
    init(hex: String) {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(hex.utf8.count / 2)
        var high: UInt8?
        for c in hex.utf8 {
            let nibble: UInt8 = switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            default: fatalError("bad hex")
            }
            if let h = high { bytes.append(h << 4 | nibble); high = nil } else { high = nibble }
        }
        self = bytes
    }
}

enum Fixtures {
    /// The datagrams captured for a step of netns-scripts/tools/capture-fixtures.py.
    static func datagrams(_ step: String) -> [[UInt8]] {
        guard let entry = Captured.steps.first(where: { $0.step == step }) else {
            fatalError("no captured step \(step)")
        }
        return entry.datagrams.map { [UInt8](hex: $0) }
    }

    static var allDatagrams: [(step: String, bytes: [UInt8])] {
        Captured.steps.flatMap { step in step.datagrams.map { (step.step, [UInt8](hex: $0)) } }
    }

    /// Every message of a step, parsed.
    static func messages(_ step: String) throws -> [NetlinkMessage] {
        try datagrams(step).flatMap { try parseNetlinkMessages($0) }
    }
}

/// Builds netlink messages by hand for the malformed-input tests (host byte order, like the kernel).
enum Build {
    static func bytes<T>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value) { Array($0) }
    }

    static func padded(_ bytes: [UInt8]) -> [UInt8] {
        bytes + [UInt8](repeating: 0, count: (4 - bytes.count % 4) % 4)
    }

    static func attribute(_ type: UInt16, _ payload: [UInt8]) -> [UInt8] {
        padded(bytes(UInt16(4 + payload.count)) + bytes(type) + payload)
    }

    static func message(type: UInt16, flags: UInt16 = 0, sequence: UInt32 = 0, portID: UInt32 = 0,
                        payload: [UInt8], length: UInt32? = nil) -> [UInt8] {
        let body = padded(payload)
        return bytes(length ?? UInt32(16 + body.count)) + bytes(type) + bytes(flags) + bytes(sequence)
            + bytes(portID) + body
    }

    /// struct ifaddrmsg
    static func ifaddrmsg(family: UInt8, prefixLength: UInt8, flags: UInt8 = 0, scope: UInt8 = 0, index: UInt32) -> [UInt8] {
        [family, prefixLength, flags, scope] + bytes(index)
    }

    /// struct ifinfomsg
    static func ifinfomsg(family: UInt8 = 0, index: Int32, flags: UInt32) -> [UInt8] {
        [family, 0] + bytes(UInt16(1)) + bytes(index) + bytes(flags) + bytes(UInt32(0))
    }

    static let RTM_NEWLINK: UInt16 = 16
    static let RTM_DELLINK: UInt16 = 17
    static let RTM_NEWADDR: UInt16 = 20
    static let RTM_DELADDR: UInt16 = 21
    static let IFA_ADDRESS: UInt16 = 1
    static let IFA_LOCAL: UInt16 = 2
    static let IFA_LABEL: UInt16 = 3
    static let IFA_FLAGS: UInt16 = 8
    static let IFLA_IFNAME: UInt16 = 3
    static let IFLA_OPERSTATE: UInt16 = 16
    static let AF_INET: UInt8 = 2
    static let AF_INET6: UInt8 = 10

    static func newAddress(_ address: [UInt8], family: UInt8 = AF_INET, prefixLength: UInt8 = 24, index: UInt32 = 3,
                           extra: [UInt8] = []) -> [UInt8] {
        message(type: RTM_NEWADDR, payload: ifaddrmsg(family: family, prefixLength: prefixLength, index: index)
            + attribute(IFA_LOCAL, address) + attribute(IFA_ADDRESS, address) + extra)
    }

    static func newLink(index: Int32, name: String, flags: UInt32 = 0x11043, operState: UInt8 = 6) -> [UInt8] {
        message(type: RTM_NEWLINK, payload: ifinfomsg(index: index, flags: flags)
            + attribute(IFLA_IFNAME, Array(name.utf8) + [0]) + attribute(IFLA_OPERSTATE, [operState]))
    }
}

/// Values for table tests.
enum Sample {
    static let upFlags: UInt32 = 0x11043      // UP | BROADCAST | RUNNING | MULTICAST | LOWER_UP
    static let downFlags: UInt32 = 0x1002     // BROADCAST | MULTICAST

    static func link(_ index: Int32, _ name: String, up: Bool = true) -> NetworkInterface {
        NetworkInterface(index: index, name: name, isUp: up, isLoopback: false,
                         flags: up ? upFlags : downFlags, operState: up ? 6 : 2)
    }

    static func v4(_ address: String, prefix: UInt8 = 24, on index: Int32 = 2, flags: UInt32 = 0x80, scope: UInt8 = 0) -> InterfaceAddress {
        InterfaceAddress(interfaceIndex: index, interfaceName: "", family: .inet, address: address,
                         prefixLength: prefix, scope: scope, flags: flags)
    }

    static func v6(_ address: String, prefix: UInt8 = 64, on index: Int32 = 2, flags: UInt32 = 0x80, scope: UInt8 = 0) -> InterfaceAddress {
        InterfaceAddress(interfaceIndex: index, interfaceName: "", family: .inet6, address: address,
                         prefixLength: prefix, scope: scope, flags: flags)
    }

    static let tentative: UInt32 = 0x40
    static let dadFailed: UInt32 = 0x08
    static let deprecated: UInt32 = 0x20
    static let optimistic: UInt32 = 0x04
}

extension InterfaceEvent {
    /// A compact form for assertions: "addressAdded 192.0.2.1", "interfaceDown d0".
    var brief: String {
        switch self {
        case .interfaceUp(let i): "interfaceUp \(i.name)"
        case .interfaceDown(let i): "interfaceDown \(i.name)"
        case .interfaceRemoved(let i): "interfaceRemoved \(i.name)"
        case .addressAdded(let a): "addressAdded \(a.address)"
        case .addressRemoved(let a): "addressRemoved \(a.address)"
        }
    }
}
