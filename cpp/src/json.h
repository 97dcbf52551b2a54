// A small JSON reader for the files the runtime reads: config.json, the safetensors header, manifest.json.
// RFC 8259 values; numbers keep whether they were written as integers; duplicate object keys are an error (a
// config with two "d_model" keys is a mistake, not something to resolve silently). Errors are memmamba::Error
// with "line L, column C".
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace memmamba::json
{

class Value
{
public:
    enum class Kind
    {
        kNull,
        kBool,
        kNumber,
        kString,
        kArray,
        kObject
    };

    Kind kind() const { return kind_; }
    bool isNull() const { return kind_ == Kind::kNull; }
    bool isBool() const { return kind_ == Kind::kBool; }
    bool isNumber() const { return kind_ == Kind::kNumber; }
    bool isInteger() const { return kind_ == Kind::kNumber && integer_; } //!< written without '.', 'e' or 'E'
    bool isString() const { return kind_ == Kind::kString; }
    bool isArray() const { return kind_ == Kind::kArray; }
    bool isObject() const { return kind_ == Kind::kObject; }

    // Typed access; each throws memmamba::Error naming `what` when the value has another kind.
    bool asBool(std::string const& what) const;
    double asNumber(std::string const& what) const;
    int64_t asInt(std::string const& what) const; //!< an integer literal that fits int64
    std::string const& asString(std::string const& what) const;
    std::vector<Value> const& asArray(std::string const& what) const;
    std::vector<std::pair<std::string, Value>> const& asObject(std::string const& what) const; //!< in file order

    //! Member `key` of an object, or nullptr.
    Value const* find(std::string const& key) const;

    static char const* kindName(Kind k);

    static Value parse(std::string const& text); //!< the whole text must be one value (whitespace around it)

private:
    friend class Parser;
    Kind kind_{Kind::kNull};
    bool bool_{false};
    bool integer_{false};
    double number_{0};
    int64_t int_{0};
    std::string string_;
    std::vector<Value> array_;
    std::vector<std::pair<std::string, Value>> object_;
};

} // namespace memmamba::json
