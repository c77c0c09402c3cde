internal import CMnl
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The address families the monitor reports. Netlink carries others (AF_BRIDGE, AF_MPLS...), which
/// the parser reports as `.other` because no subflow can be bound to them.
public enum AddressFamily: Sendable, Hashable, CustomStringConvertible {
    case inet
    case inet6

    public var description: String {
        switch self {
        case .inet: "inet"
        case .inet6: "inet6"
        }
    }

    var addressLength: Int { self == .inet ? 4 : 16 }
    var rawValue: Int32 { self == .inet ? AF_INET : AF_INET6 }
}

/// A network link as the kernel last described it.
public struct NetworkInterface: Sendable, Hashable {
    public var index: Int32
    public var name: String
    /// Operationally up: IFF_UP and IFF_RUNNING, and an operstate of UP or UNKNOWN (the loopback
    /// device and some virtual devices never leave UNKNOWN).
    public var isUp: Bool
    public var isLoopback: Bool
    /// `IFF_*` flags (ifi_flags).
    public var flags: UInt32
    /// `IF_OPER_*` (IFLA_OPERSTATE); 0 (IF_OPER_UNKNOWN) when the kernel did not send it.
    public var operState: UInt8

    public init(index: Int32, name: String, isUp: Bool, isLoopback: Bool = false, flags: UInt32 = 0, operState: UInt8 = 0) {
        self.index = index
        self.name = name
        self.isUp = isUp
        self.isLoopback = isLoopback
        self.flags = flags
        self.operState = operState
    }
}

/// One address on one interface.
///
/// Identity for bookkeeping is ``key`` (interface index, family, address, prefix length): the name,
/// flags and scope of an address can change while it stays the same address.
public struct InterfaceAddress: Sendable, Hashable, CustomStringConvertible {
    public var interfaceIndex: Int32
    /// Name of the link. Parsed messages carry IFA_LABEL here (IPv4 only, and it may be an alias
    /// such as `eth0:1`); ``InterfaceTable`` replaces it with the link's name once the link is known.
    public var interfaceName: String
    public var family: AddressFamily
    /// Textual form (inet_ntop), e.g. `192.0.2.1` or `2001:db8::1`.
    public var address: String
    public var prefixLength: UInt8
    /// `RT_SCOPE_*`: 0 universe, 200 site, 253 link, 254 host.
    public var scope: UInt8
    /// `IFA_F_*`. Taken from the 32-bit IFA_FLAGS attribute when present, because the 8-bit
    /// ifa_flags header field cannot hold flags above 0x80 (MANAGETEMPADDR, NOPREFIXROUTE, ...).
    public var flags: UInt32

    public init(interfaceIndex: Int32, interfaceName: String, family: AddressFamily, address: String,
                prefixLength: UInt8, scope: UInt8 = 0, flags: UInt32 = 0) {
        self.interfaceIndex = interfaceIndex
        self.interfaceName = interfaceName
        self.family = family
        self.address = address
        self.prefixLength = prefixLength
        self.scope = scope
        self.flags = flags
    }

    public struct Key: Sendable, Hashable {
        public var interfaceIndex: Int32
        public var family: AddressFamily
        public var address: String
        // IPv4 allows the same address twice on one link with different prefixes; each is a
        // separate kernel object with its own RTM_DELADDR.
        public var prefixLength: UInt8
    }

    public var key: Key {
        Key(interfaceIndex: interfaceIndex, family: family, address: address, prefixLength: prefixLength)
    }

    public var isTentative: Bool { flags & UInt32(IFA_F_TENTATIVE) != 0 }
    public var isOptimistic: Bool { flags & UInt32(IFA_F_OPTIMISTIC) != 0 }
    public var isDeprecated: Bool { flags & UInt32(IFA_F_DEPRECATED) != 0 }
    public var isDADFailed: Bool { flags & UInt32(IFA_F_DADFAILED) != 0 }

    /// Link scope, or inside fe80::/10 or 169.254.0.0/16 (an IPv4 link-local address added by hand
    /// gets universe scope unless the admin says otherwise).
    public var isLinkLocal: Bool {
        if scope == UInt8(RT_SCOPE_LINK.rawValue) { return true }
        guard let bytes = addressBytes else { return false }
        switch family {
        case .inet: return bytes[0] == 169 && bytes[1] == 254
        case .inet6: return bytes[0] == 0xfe && bytes[1] & 0xc0 == 0x80
        }
    }

    /// Host scope, or inside 127.0.0.0/8 or ::1.
    public var isLoopback: Bool {
        if scope == UInt8(RT_SCOPE_HOST.rawValue) { return true }
        guard let bytes = addressBytes else { return false }
        switch family {
        case .inet: return bytes[0] == 127
        case .inet6: return bytes[0..<15].allSatisfy { $0 == 0 } && bytes[15] == 1
        }
    }

    /// Whether a subflow may be bound to this address right now.
    ///
    /// Deprecated addresses stay usable (existing sessions keep them until they are removed).
    /// Optimistic DAD addresses are tentative but the kernel lets them be bound, so they count.
    public var isUsableForSubflows: Bool {
        !isLoopback && !isLinkLocal && !(isTentative && !isOptimistic) && !isDADFailed
    }

    public var description: String {
        var text = "\(address)/\(prefixLength) dev \(interfaceName.isEmpty ? "#\(interfaceIndex)" : interfaceName)"
        if isTentative { text += " tentative" }
        if isDeprecated { text += " deprecated" }
        if isDADFailed { text += " dadfailed" }
        return text
    }

    var addressBytes: [UInt8]? {
        var storage = [UInt8](repeating: 0, count: 16)
        let ok = storage.withUnsafeMutableBytes { buffer in
            inet_pton(family.rawValue, address, buffer.baseAddress) == 1
        }
        return ok ? storage : nil
    }
}

/// A change that matters to a path manager.
///
/// Address events mean "became usable for subflows" and "stopped being usable": an address that
/// appears tentative produces `addressAdded` only when DAD completes, and addresses on a link that
/// goes down are reported removed (and added again when it comes back up).
public enum InterfaceEvent: Sendable, Hashable, CustomStringConvertible {
    case interfaceUp(NetworkInterface)
    case interfaceDown(NetworkInterface)
    case interfaceRemoved(NetworkInterface)
    case addressAdded(InterfaceAddress)
    case addressRemoved(InterfaceAddress)

    public var description: String {
        switch self {
        case .interfaceUp(let i): "interfaceUp \(i.name) (#\(i.index))"
        case .interfaceDown(let i): "interfaceDown \(i.name) (#\(i.index))"
        case .interfaceRemoved(let i): "interfaceRemoved \(i.name) (#\(i.index))"
        case .addressAdded(let a): "addressAdded \(a)"
        case .addressRemoved(let a): "addressRemoved \(a)"
        }
    }
}
