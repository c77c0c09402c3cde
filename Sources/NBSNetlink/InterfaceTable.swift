/// The monitor's view of links and addresses, and the diff logic that turns netlink messages into
/// ``InterfaceEvent``s. A pure value: tests drive it with parsed messages, no socket needed.
///
/// An address is *usable* when ``InterfaceAddress/isUsableForSubflows`` holds and its link is up
/// (or not known yet: links are dumped before addresses, so an unknown link only happens when a
/// caller feeds addresses alone). Address events report changes of usability only.
public struct InterfaceTable: Sendable, Equatable {
    private var links: [Int32: NetworkInterface] = [:]
    private var addressesByKey: [InterfaceAddress.Key: InterfaceAddress] = [:]
    private var resync: ResyncMarks?

    private struct ResyncMarks: Sendable, Equatable {
        var links: Set<Int32> = []
        var addresses: Set<InterfaceAddress.Key> = []
    }

    public init() {}

    /// All known links, by index.
    public var interfaces: [NetworkInterface] {
        links.values.sorted { $0.index < $1.index }
    }

    /// All known addresses, including loopback, link-local and tentative ones.
    public var addresses: [InterfaceAddress] {
        addressesByKey.values.sorted(by: Self.addressOrder)
    }

    /// The addresses a path manager may bind subflows to now.
    public var usableAddresses: [InterfaceAddress] {
        addresses.filter(isUsable)
    }

    public func interface(index: Int32) -> NetworkInterface? { links[index] }

    /// The events that describe the current state as a change from an empty table: `interfaceUp`
    /// for each up link, then `addressAdded` for each usable address. New subscribers get these
    /// first, so they never have to merge a snapshot with a stream.
    public var currentStateEvents: [InterfaceEvent] {
        interfaces.filter(\.isUp).map(InterfaceEvent.interfaceUp) + usableAddresses.map(InterfaceEvent.addressAdded)
    }

    /// Applies one message and returns what changed, in order.
    public mutating func apply(_ message: NetlinkMessage) -> [InterfaceEvent] {
        switch message {
        case .newLink(let link): return applyNewLink(link)
        case .delLink(let link): return removeLink(index: link.index)
        case .newAddress(let address): return applyNewAddress(address)
        case .delAddress(let address): return removeAddress(key: address.key)
        case .done, .ack, .error, .other, .malformed: return []
        }
    }

    public mutating func apply(_ messages: [NetlinkMessage]) -> [InterfaceEvent] {
        messages.flatMap { apply($0) }
    }

    /// Starts a full re-dump (after start-up or a lost message). Everything applied until
    /// ``finishResync()`` counts as seen; whatever was not seen is then removed. Events that arrive
    /// between the dump replies count as seen too, so a change racing the dump is not undone.
    public mutating func beginResync() {
        resync = ResyncMarks()
    }

    /// Ends a re-dump: removes links and addresses the dump did not mention and returns the events.
    public mutating func finishResync() -> [InterfaceEvent] {
        guard let marks = resync else { return [] }
        resync = nil
        var events: [InterfaceEvent] = []
        for index in links.keys.sorted() where !marks.links.contains(index) {
            events += removeLink(index: index)
        }
        for key in addressesByKey.keys.sorted(by: Self.keyOrder) where !marks.addresses.contains(key) {
            events += removeAddress(key: key)
        }
        return events
    }

    /// Abandons a re-dump without removing anything (the dump failed part way).
    public mutating func cancelResync() {
        resync = nil
    }

    // MARK: - Mutations

    private mutating func applyNewLink(_ incoming: NetworkInterface) -> [InterfaceEvent] {
        resync?.links.insert(incoming.index)
        var link = incoming
        let old = links[link.index]
        if link.name.isEmpty, let old { link.name = old.name }
        let usableBefore = usableAddressKeys(onInterface: link.index)
        links[link.index] = link
        if old?.name != link.name {
            // A rename keeps the addresses; only their cached name changes. No event: the address
            // has not changed usability, and path managers key addresses by index and address.
            for (key, address) in addressesByKey where address.interfaceIndex == link.index {
                addressesByKey[key]?.interfaceName = link.name
            }
        }
        var events: [InterfaceEvent] = []
        let wasUp = old?.isUp ?? false
        if link.isUp && !wasUp { events.append(.interfaceUp(link)) }
        if !link.isUp && wasUp { events.append(.interfaceDown(link)) }
        events += usabilityChanges(onInterface: link.index, before: usableBefore)
        return events
    }

    private mutating func removeLink(index: Int32) -> [InterfaceEvent] {
        let usableBefore = usableAddressKeys(onInterface: index)
        let old = links.removeValue(forKey: index)
        var removed: [InterfaceAddress] = []
        for (key, address) in addressesByKey where address.interfaceIndex == index {
            addressesByKey[key] = nil
            removed.append(address)
        }
        var events: [InterfaceEvent] = []
        if let old { events.append(.interfaceRemoved(old)) }
        events += removed.sorted(by: Self.addressOrder)
            .filter { usableBefore.contains($0.key) }
            .map(InterfaceEvent.addressRemoved)
        return events
    }

    private mutating func applyNewAddress(_ incoming: InterfaceAddress) -> [InterfaceEvent] {
        var address = incoming
        if let link = links[address.interfaceIndex] { address.interfaceName = link.name }
        let key = address.key
        resync?.addresses.insert(key)
        let wasUsable = addressesByKey[key].map(isUsable) ?? false
        addressesByKey[key] = address
        let isUsableNow = isUsable(address)
        if isUsableNow && !wasUsable { return [.addressAdded(address)] }
        if !isUsableNow && wasUsable { return [.addressRemoved(address)] }
        return []
    }

    private mutating func removeAddress(key: InterfaceAddress.Key) -> [InterfaceEvent] {
        guard let old = addressesByKey.removeValue(forKey: key) else { return [] }
        return isUsable(old) ? [.addressRemoved(old)] : []
    }

    // MARK: - Helpers

    private func isUsable(_ address: InterfaceAddress) -> Bool {
        address.isUsableForSubflows && (links[address.interfaceIndex]?.isUp ?? true)
    }

    private func usableAddressKeys(onInterface index: Int32) -> Set<InterfaceAddress.Key> {
        Set(addressesByKey.values.filter { $0.interfaceIndex == index && isUsable($0) }.map(\.key))
    }

    private func usabilityChanges(onInterface index: Int32, before: Set<InterfaceAddress.Key>) -> [InterfaceEvent] {
        let after = usableAddressKeys(onInterface: index)
        let removed = before.subtracting(after).compactMap { addressesByKey[$0] }.sorted(by: Self.addressOrder)
        let added = after.subtracting(before).compactMap { addressesByKey[$0] }.sorted(by: Self.addressOrder)
        return removed.map(InterfaceEvent.addressRemoved) + added.map(InterfaceEvent.addressAdded)
    }

    private static func addressOrder(_ a: InterfaceAddress, _ b: InterfaceAddress) -> Bool {
        keyOrder(a.key, b.key)
    }

    private static func keyOrder(_ a: InterfaceAddress.Key, _ b: InterfaceAddress.Key) -> Bool {
        if a.interfaceIndex != b.interfaceIndex { return a.interfaceIndex < b.interfaceIndex }
        if a.family != b.family { return a.family == .inet }
        if a.address != b.address { return a.address < b.address }
        return a.prefixLength < b.prefixLength
    }
}
